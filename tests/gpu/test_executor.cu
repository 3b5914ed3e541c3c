// The CUDA executor's whole forward pass against the CPU executor (the fp32 reference) on random
// models of several shapes: prefill of a ragged batch, decode steps, fork + truncate, and the
// errors a caller can trip (token outside the vocabulary, a full KV pool, a shape with no kernel).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include "nibble/backend/backend.h"
#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/model/model.h"
#include "gpu_test_util.h"

namespace nibble {
namespace {

// Uniform values of scale `range`, rounded to fp16 so the GPU holds exactly the CPU's weights.
std::vector<float> random_fp16(std::mt19937_64& rng, int64_t n, float range) {
  std::uniform_real_distribution<float> u(-range, range);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = round_fp16(u(rng));
  return v;
}

std::unique_ptr<Linear> random_linear(std::mt19937_64& rng, int64_t in, int64_t out, bool bias) {
  const float range = std::sqrt(3.0f / float(in));  // unit variance out for unit variance in
  return std::make_unique<DenseLinear>(in, out, random_fp16(rng, in * out, range),
                                       bias ? random_fp16(rng, out, 0.5f) : std::vector<float>{});
}

std::unique_ptr<Model> random_model(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto norm = [&](int64_t n) {
    std::vector<float> w = random_fp16(rng, n, 0.2f);
    for (float& x : w) x = round_fp16(1.0f + x);
    return w;
  };
  std::vector<float> embedding = random_fp16(rng, c.vocab_size * c.hidden_size, 1.0f);
  std::vector<Layer> layers;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer layer;
    layer.attn_norm = norm(c.hidden_size);
    layer.mlp_norm = norm(c.hidden_size);
    layer.qkv = random_linear(rng, c.hidden_size, c.q_dim() + 2 * c.kv_dim(), c.attention_bias);
    layer.o = random_linear(rng, c.q_dim(), c.hidden_size, false);
    layer.experts.push_back({random_linear(rng, c.hidden_size, 2 * c.intermediate_size, false),
                             random_linear(rng, c.intermediate_size, c.hidden_size, false)});
    layers.push_back(std::move(layer));
  }
  std::unique_ptr<Linear> head =
      c.tie_word_embeddings ? std::make_unique<DenseLinear>(c.hidden_size, c.vocab_size, embedding)
                            : random_linear(rng, c.hidden_size, c.vocab_size, false);
  return std::make_unique<Model>(c, "random", std::move(embedding), std::move(layers), norm(c.hidden_size),
                                 std::move(head));
}

ModelConfig llama_like() {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_layers = 3;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  return c;
}

ModelConfig qwen2_like() {
  ModelConfig c = llama_like();
  c.arch = Arch::Qwen2;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.head_dim = 128;
  c.attention_bias = true;
  c.tie_word_embeddings = true;
  c.rope_theta = 1e6;
  return c;
}

struct Compare {
  double rel_max = 0;  // max |gpu - cpu| / max |cpu|
  double top1 = 0;     // rows whose argmax agrees
};

Compare compare(const std::vector<float>& gpu, const std::vector<float>& cpu, int64_t vocab) {
  EXPECT_EQ(gpu.size(), cpu.size());
  double diff = 0, ref = 0;
  int64_t agree = 0, rows = int64_t(cpu.size()) / vocab;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gpu.data() + r * vocab;
    const float* c = cpu.data() + r * vocab;
    for (int64_t i = 0; i < vocab; ++i) {
      diff = std::max(diff, std::abs(double(g[i]) - double(c[i])));
      ref = std::max(ref, std::abs(double(c[i])));
    }
    agree += std::max_element(g, g + vocab) - g == std::max_element(c, c + vocab) - c;
  }
  return {diff / ref, double(agree) / double(rows)};
}

// fp16 weights are exact on both sides; the GPU rounds each linear's input and output to fp16
// (relative 2^-11 each) and accumulates in another order, so after a few layers the logits differ
// by a few 1e-3 of their range. 1e-2 leaves room for that and catches any wrong index or scale.
constexpr double kRelTol = 1e-2;

void run_case(const ModelConfig& c, uint64_t seed) {
  std::printf("seed %llu, head_dim %lld, bias %d, tied %d\n", (unsigned long long)seed, (long long)c.head_dim,
              int(c.attention_bias), int(c.tie_word_embeddings));
  auto model = random_model(c, seed);
  RuntimeOptions copt, gopt;
  gopt.device = "cuda";
  gopt.max_batch_tokens = 512;
  gopt.kv_pages = 64;
  auto cpu = make_executor(*model, copt);
  auto gpu = make_executor(*model, gopt);
  std::mt19937_64 rng(seed + 1);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size - 1));

  // A ragged prefill: 1, 45 and 130 tokens, every row scored.
  const int lens[] = {1, 45, 130};
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SeqId> cs, gs;
  std::vector<BatchEntry> cb, gb;
  for (int len : lens) {
    std::vector<int32_t> p(static_cast<size_t>(len));
    for (int32_t& t : p) t = tok(rng);
    prompts.push_back(std::move(p));
    cs.push_back(cpu->kv().add());
    gs.push_back(gpu->kv().add());
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    cb.push_back({cs[i], prompts[i], true});
    gb.push_back({gs[i], prompts[i], true});
  }
  std::vector<float> cl, gl;
  cpu->forward(cb, cl);
  gpu->forward(gb, gl);
  Compare r = compare(gl, cl, c.vocab_size);
  std::printf("  prefill 1+45+130: rel max %.2e, top-1 %.3f\n", r.rel_max, r.top1);
  EXPECT_LE(r.rel_max, kRelTol);
  EXPECT_GE(r.top1, 0.95);

  // Greedy decode steps (the CPU's choice fed to both), one token per sequence.
  for (int step = 0; step < 6; ++step) {
    std::vector<int32_t> next(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      const float* row = cl.data() + (step == 0 ? (std::accumulate(lens, lens + i + 1, 0) - 1) : int(i)) * c.vocab_size;
      next[i] = int32_t(std::max_element(row, row + c.vocab_size) - row);
    }
    cb.clear();
    gb.clear();
    for (size_t i = 0; i < prompts.size(); ++i) {
      cb.push_back({cs[i], {&next[i], 1}, false});
      gb.push_back({gs[i], {&next[i], 1}, false});
    }
    cpu->forward(cb, cl);
    gpu->forward(gb, gl);
    r = compare(gl, cl, c.vocab_size);
    std::printf("  decode step %d: rel max %.2e, top-1 %.3f\n", step, r.rel_max, r.top1);
    EXPECT_LE(r.rel_max, kRelTol);
  }
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(gpu->kv().length(gs[i]), cpu->kv().length(cs[i]));

  // Fork the longest sequence, cut it back to 20 tokens, and continue with 17 new ones.
  const SeqId cf = cpu->kv().fork(cs[2]), gf = gpu->kv().fork(gs[2]);
  cpu->kv().truncate(cf, 20);
  gpu->kv().truncate(gf, 20);
  std::vector<int32_t> more(17);
  for (int32_t& t : more) t = tok(rng);
  const BatchEntry ce{cf, more, true}, ge{gf, more, true};
  cpu->forward({&ce, 1}, cl);
  gpu->forward({&ge, 1}, gl);
  r = compare(gl, cl, c.vocab_size);
  std::printf("  fork + truncate + 17: rel max %.2e, top-1 %.3f\n", r.rel_max, r.top1);
  EXPECT_LE(r.rel_max, kRelTol);
}

TEST(CudaExecutor, LlamaShapeMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(llama_like(), std::random_device{}());
}

TEST(CudaExecutor, Qwen2ShapeWithBiasAndTiedHeadMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(qwen2_like(), std::random_device{}());
}

TEST(CudaExecutor, RefusesWhatItCannotRun) {
  NIBBLE_REQUIRE_GPU();
  ModelConfig c = llama_like();
  c.head_dim = 32;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  auto model = random_model(c, 7);
  RuntimeOptions o;
  o.device = "cuda";
  o.kv_pages = 64;
  EXPECT_THROW(make_executor(*model, o), Error);
}

TEST(CudaExecutor, BadInputLeavesTheSequencesUnchanged) {
  NIBBLE_REQUIRE_GPU();
  const ModelConfig c = llama_like();
  auto model = random_model(c, 11);
  RuntimeOptions o;
  o.device = "cuda";
  o.max_batch_tokens = 512;
  o.kv_pages = 40;  // 640 tokens: room for one full context, not two
  auto gpu = make_executor(*model, o);
  const SeqId a = gpu->kv().add(), b = gpu->kv().add();
  std::vector<int32_t> bad = {1, 2, int32_t(c.vocab_size)};
  BatchEntry e{a, bad, false};
  std::vector<float> logits;
  EXPECT_THROW(gpu->forward({&e, 1}, logits), Error);
  EXPECT_EQ(gpu->kv().length(a), 0);
  std::vector<int32_t> full(400, 3);
  const BatchEntry two[] = {{a, full, false}, {b, full, false}};  // 800 tokens > 640
  EXPECT_THROW(gpu->forward(two, logits), Error);
  EXPECT_EQ(gpu->kv().length(a), 0);
  EXPECT_EQ(gpu->kv().length(b), 0);
  gpu->forward({two, 1}, logits);  // one of them fits
  EXPECT_EQ(gpu->kv().length(a), 400);
  EXPECT_EQ(logits.size(), size_t(c.vocab_size));
}

}  // namespace
}  // namespace nibble
