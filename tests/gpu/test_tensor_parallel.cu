// Tensor parallelism on the GPU (backend/tensor_parallel.h, backend/cuda/nccl_comm.h): a group of
// CUDA rank executors joined by NCCL against the one-GPU executor on the same random model, through
// a ragged prefill and decode steps replayed as CUDA graphs (NCCL calls captured in them).
//   world 1: the whole tensor-parallel path (NCCL init, every collective, the vocabulary gather)
//            on one GPU: the same logits, bit for bit (a one-rank all-reduce is a copy);
//   world 2: needs two GPUs (skipped otherwise): the row-parallel partial products are summed in
//            fp16, one more rounding than the one GPU's, so FP16 logits agree to fp16 rounding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include "nibble/backend/backend.h"
#include "nibble/backend/tensor_parallel.h"
#include "nibble/core/error.h"
#include "nibble/model/model.h"
#include "nibble/quant/quant_linear.h"
#include "gpu_test_util.h"
#include "random_model.h"
#include "tests/prefill_and_decode.h"

namespace nibble {
namespace {

constexpr uint64_t kSeed = 1919;

// llama_like with 8 heads of 64 on 2 KV heads: under Atom's layout every linear of each of two
// ranks holds INT4 groups (o_proj: 3 groups + 128 keepers; down_proj: 3 + 128).
ModelConfig tp_like() {
  ModelConfig c = llama_like();
  c.num_heads = 8;
  return c;
}

// Atom's W4A4 form on every linear (RTN, random input order, group Hadamard), down_proj's order
// folded away as the quantizer leaves it (the shard plan splits gate/up's rows and down's columns alike).
void quantize_atom(Model& m, uint64_t seed) { quantize_layers(m, seed, atom_spec(true), /*permute_down=*/false); }

struct Compare {
  double rel_max = 0, kld = 0, top1 = 0;
};

Compare compare(const std::vector<float>& got, const std::vector<float>& want, int64_t vocab) {
  EXPECT_EQ(got.size(), want.size());
  Compare out;
  double diff = 0, ref = 0;
  const int64_t rows = int64_t(std::min(got.size(), want.size())) / vocab;
  int64_t agree = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = got.data() + r * vocab, *w = want.data() + r * vocab;
    const double gmax = *std::max_element(g, g + vocab), wmax = *std::max_element(w, w + vocab);
    double gs = 0, ws = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      diff = std::max(diff, std::abs(double(g[i]) - w[i]));
      ref = std::max(ref, std::abs(double(w[i])));
      gs += std::exp(g[i] - gmax);
      ws += std::exp(w[i] - wmax);
    }
    for (int64_t i = 0; i < vocab; ++i) {
      const double lw = w[i] - wmax - std::log(ws), lg = g[i] - gmax - std::log(gs);
      out.kld += std::exp(lw) * (lw - lg);
    }
    agree += std::max_element(g, g + vocab) - g == std::max_element(w, w + vocab) - w;
  }
  out.rel_max = diff / ref;
  out.kld /= double(rows);
  out.top1 = double(agree) / double(rows);
  return out;
}

RuntimeOptions gpu_options(int tp) {
  RuntimeOptions opt;
  opt.device = "cuda";
  opt.max_batch_tokens = 512;
  opt.kv_pages = 64;
  opt.tp = tp;
  return opt;
}

int gpu_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// The group of `world` ranks against the one-GPU executor on the same model.
Compare sharded_vs_one_gpu(Model& m, int world, const std::string& what) {
  auto one = make_executor(m, gpu_options(1));
  const std::vector<float> want = test::prefill_and_decode(*one, kSeed, 37, 11, 5);
  one.reset();
  const auto group = make_tensor_parallel_executor(m, gpu_options(world));
  const Compare c = compare(test::prefill_and_decode(*group, kSeed, 37, 11, 5), want, m.config().vocab_size);
  std::printf("%s, world %d (%s): rel max %.3g, KLD %.3g, top-1 %.3f\n", what.c_str(), world,
              group->device_name().c_str(), c.rel_max, c.kld, c.top1);
  return c;
}

TEST(TensorParallelGpu, WorldOneIsTheOneGpuExecutorBitForBit) {
  NIBBLE_REQUIRE_GPU();
  for (bool atom : {false, true}) {
    auto m = random_model(tp_like(), kSeed);
    if (atom) quantize_atom(*m, kSeed + 1);
    const Compare c = sharded_vs_one_gpu(*m, 1, atom ? "atom w4a4" : "fp16");
    EXPECT_EQ(c.rel_max, 0.0) << (atom ? "atom w4a4" : "fp16");
  }
}

TEST(TensorParallelGpu, WorldTwoMatchesOneGpu) {
  NIBBLE_REQUIRE_GPU();
  if (gpu_count() < 2) GTEST_SKIP() << "skipped: world size 2 needs 2 GPUs; " << gpu_count() << " visible";
  auto fp16 = random_model(tp_like(), kSeed);
  // fp16 partial sums: one more fp16 rounding per row-parallel layer than the one GPU's product
  // (the executor test's 1e-2 of the logits' range covers a few such roundings across layers).
  EXPECT_LE(sharded_vs_one_gpu(*fp16, 2, "fp16").rel_max, 1e-2);
  // W4A4: a sum that rounds the other way can move an INT4 activation code by one step; held to
  // the packed model's KLD bound (the executor test's 5e-3).
  auto atom = random_model(tp_like(), kSeed);
  quantize_atom(*atom, kSeed + 1);
  EXPECT_LE(sharded_vs_one_gpu(*atom, 2, "atom w4a4").kld, 5e-3);
}

TEST(TensorParallelGpu, MoreRanksThanGpusIsRefusedNamingTheCount) {
  NIBBLE_REQUIRE_GPU();
  const int n = gpu_count();
  ModelConfig c = llama_like();
  c.num_heads = c.num_kv_heads = 2 * (n + 1);  // the shard plan accepts n + 1 ranks
  auto m = random_model(c, kSeed);
  try {
    make_tensor_parallel_executor(*m, gpu_options(n + 1));
    ADD_FAILURE() << "--tp " << n + 1 << " was accepted with " << n << " GPUs";
  } catch (const Error& e) {
    const std::string want = std::to_string(n + 1) + " ranks need " + std::to_string(n + 1) + " GPUs; " +
                             std::to_string(n) + " visible";
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nibble
