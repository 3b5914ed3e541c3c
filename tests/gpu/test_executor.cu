// The CUDA executor's whole forward pass against the CPU executor (the fp32 reference) on random
// models of several shapes: prefill of a ragged batch, decode steps (replayed as CUDA graphs),
// fork + truncate, graphs against eager launches, and the errors a caller can trip (token outside
// the vocabulary, a full KV pool, a shape with no kernel).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <numeric>
#include <random>

#include "nibble/backend/backend.h"
#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/engine/engine.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/quant_linear.h"
#include "nibble/quant/recipe.h"
#include "nibble/tokenizer/tokenizer.h"
#include "gpu_test_util.h"
#include "random_model.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

// Mixtral's sparse MLP: 4 experts, 2 per token, GQA.
ModelConfig mixtral_like() {
  ModelConfig c = llama_like();
  c.arch = Arch::Mixtral;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.rope_theta = 1e6;
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
  double rel_max = 0;     // max |gpu - cpu| / max |cpu|
  double top1 = 0;        // of the rows the CPU decides (its two best logits `tie` apart or more), those agreeing
  double kld = 0;         // mean KL(cpu || gpu) of the softmax distributions
  int64_t rows_past = 0;  // rows whose max |gpu - cpu| / max |cpu| exceeds `rel_tol`
};

// `tie` and `rel_tol` are fractions of max |cpu|: rows whose best two CPU logits are closer than
// `tie` are left out of top-1 (a tie at the resolution the logits are held to decides nothing).
Compare compare(const std::vector<float>& gpu, const std::vector<float>& cpu, int64_t vocab, double tie = 0,
                double rel_tol = 1) {
  EXPECT_EQ(gpu.size(), cpu.size());
  const int64_t rows = int64_t(cpu.size()) / vocab;
  double ref = 0;
  for (float v : cpu) ref = std::max(ref, std::abs(double(v)));
  double kld = 0, worst = 0;
  int64_t decided = 0, agree = 0, past = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gpu.data() + r * vocab;
    const float* c = cpu.data() + r * vocab;
    const int64_t gbest = std::max_element(g, g + vocab) - g, cbest = std::max_element(c, c + vocab) - c;
    double gs = 0, cs = 0, diff = 0, second = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) {
      diff = std::max(diff, std::abs(double(g[i]) - double(c[i])));
      gs += std::exp(double(g[i]) - g[gbest]);
      cs += std::exp(double(c[i]) - c[cbest]);
      if (i != cbest) second = std::max(second, double(c[i]));
    }
    for (int64_t i = 0; i < vocab; ++i) {
      const double lc = double(c[i]) - c[cbest] - std::log(cs), lg = double(g[i]) - g[gbest] - std::log(gs);
      kld += std::exp(lc) * (lc - lg);
    }
    worst = std::max(worst, diff);
    past += diff > rel_tol * ref;
    if (c[cbest] - second >= tie * ref) ++decided, agree += gbest == cbest;
  }
  return {worst / ref, decided ? double(agree) / double(decided) : 1.0, kld / double(rows), past};
}

// fp16 weights are exact on both sides; the GPU rounds each linear's input and output to fp16
// (relative 2^-11 each) and accumulates in another order, so after a few layers the logits differ
// by a few 1e-3 of their range. 1e-2 leaves room for that and catches any wrong index or scale.
constexpr double kRelTol = 1e-2;

// What a comparison must meet. FP16 is held to kRelTol. With INT4 activations or KV, the GPU flips
// a code wherever its fp16 input lands on the other side of a rounding boundary than the CPU's
// fp32 one, and on a random network such flips cascade: the CPU itself, run with fp16-rounded
// activations (Model::set_fp16_activations), moves as far (KLD 1e-4..3e-2 over seeds and shapes,
// measured). So a quantized case is held to that sensitivity, measured on the same inputs: KLD at
// most 2x the CPU's own fp16-vs-fp32 KLD + 5e-3 (the issue's bound for the packed model), top-1 at
// most 0.15 below it. A wrong permutation, scale or rotation moves KLD by orders of magnitude more.
struct Bounds {
  double rel_max = kRelTol, kld = 1e-4, top1 = 0.95;
  double tie = kRelTol;  // top-1 leaves out rows tied within the tolerance the logits are held to
  // Rows allowed past rel_max. A mixture-of-experts row whose two best router scores nearly tie may
  // pick the other expert on the GPU (its router input differs from the CPU's by fp16 rounding) and
  // move by O(1); a wrong expert index or weight moves every row, and the KLD bound still holds the step.
  int64_t rows_past_rel_max = 0;
};

void expect_within(const std::vector<float>& g, const std::vector<float>& r, int64_t vocab, const Bounds& b,
                   const std::string& what) {
  const Compare c = compare(g, r, vocab, b.tie, b.rel_max);
  std::printf("  %s: rel max %.2e (%lld rows past %.0e), KLD %.2e, top-1 %.3f (bounds: KLD %.2e, top-1 %.3f)\n",
              what.c_str(), c.rel_max, (long long)c.rows_past, b.rel_max, c.kld, c.top1, b.kld, b.top1);
  EXPECT_LE(c.rows_past, b.rows_past_rel_max) << what;
  EXPECT_LE(c.kld, b.kld) << what;
  EXPECT_GE(c.top1, b.top1) << what;
}

// Top-1 over a handful of rows says nothing on such a network (one row is a third of a decode step),
// so it is held only where a step has many rows.
// `floor` is the KLD always allowed: 5e-3 for quantized models (the issue's bound for the packed
// model), 1e-3 for fp16 mixtures of experts (router flips only).
Bounds sensitivity_bounds(const Compare& cpu16, int64_t rows, double floor = 5e-3) {
  return {1.0, floor + 2 * cpu16.kld, rows >= 100 ? cpu16.top1 - 0.15 : 0.0, 0.0};
}

enum class Weights { Fp16, AtomW4A4, AtomW4A4Rotated, W8A8 };

const char* weights_name(Weights w) {
  switch (w) {
    case Weights::Fp16: return "fp16";
    case Weights::AtomW4A4: return "atom w4a4";
    case Weights::AtomW4A4Rotated: return "atom w4a4, group Hadamard";
    case Weights::W8A8: return "w8a8";
  }
  return "?";
}

// Replaces every linear of m's layers with its `weights` form (RTN, random input order); FP16 keeps them.
void quantize(Model& m, Weights weights, uint64_t seed) {
  if (weights == Weights::Fp16) return;
  quantize_layers(m, seed,
                  weights == Weights::W8A8 ? quant::Recipe::preset("w8a8").linear_spec(m.config().hidden_size, "test")
                                           : atom_spec(weights == Weights::AtomW4A4Rotated));
}

void run_case(const ModelConfig& c, uint64_t seed, Weights weights = Weights::Fp16, KVFormat kv = {}) {
  std::printf("seed %llu, head_dim %lld, bias %d, tied %d, %s, KV %s\n", (unsigned long long)seed,
              (long long)c.head_dim, int(c.attention_bias), int(c.tie_word_embeddings), weights_name(weights),
              kv.describe().c_str());
  // The model twice (same seed): the reference, and the same weights run with fp16 activations.
  auto model = random_model(c, seed), model16 = random_model(c, seed);
  quantize(*model, weights, seed + 2);
  quantize(*model16, weights, seed + 2);
  const bool quantized = weights != Weights::Fp16 || kv.bits == 4;
  model->set_kv_format(kv);
  model16->set_kv_format(kv);
  model16->set_fp16_activations(true);
  RuntimeOptions copt, gopt;
  gopt.device = "cuda";
  gopt.max_batch_tokens = 512;
  gopt.kv_pages = 64;
  auto cpu = make_executor(*model, copt);
  auto cpu16 = make_executor(*model16, copt);
  auto gpu = make_executor(*model, gopt);
  std::vector<float> cl, gl, hl;
  // Checks GPU against CPU logits (and, for a quantized model, the CPU's own fp16 sensitivity).
  auto check = [&](const std::vector<float>& g, const std::vector<float>& r, const std::vector<float>& h,
                   const std::string& what) {
    const int64_t rows = int64_t(r.size()) / c.vocab_size;
    Bounds b;
    // A mixture of experts is held like a quantized model even with fp16 weights: a router whose two
    // best scores nearly tie picks the other expert wherever the GPU's fp16 input differs from the
    // CPU's, and in a prefill every later row of that sequence attends to the moved one (seen: 23 of
    // 176 rows past 1e-2, KLD 1.17e-4). The CPU run with fp16 activations measures that sensitivity.
    if (quantized || c.num_experts > 0)
      b = sensitivity_bounds(compare(h, r, c.vocab_size), rows, quantized ? 5e-3 : 1e-3);
    if (c.num_experts > 0) b.rows_past_rel_max = std::max<int64_t>(1, rows / 50);
    expect_within(g, r, c.vocab_size, b, what);
  };
  // Runs one step on the three executors; checked alone, or (decode steps of 3 rows each, too few
  // for a sensitivity measured on the same rows to be more than noise) gathered and checked together.
  std::vector<float> dg, dc, dh;
  auto step = [&](const std::vector<BatchEntry>& batch, const std::string& what, bool gather = false) {
    cpu->forward(batch, cl);
    gpu->forward(batch, gl);
    cpu16->forward(batch, hl);  // always, so the three pools stay alike
    if (!gather) return check(gl, cl, hl, what);
    std::printf("  %s: ", what.c_str());
    const Compare r = compare(gl, cl, c.vocab_size);
    std::printf("rel max %.2e, KLD %.2e, top-1 %.3f\n", r.rel_max, r.kld, r.top1);
    dg.insert(dg.end(), gl.begin(), gl.end());
    dc.insert(dc.end(), cl.begin(), cl.end());
    dh.insert(dh.end(), hl.begin(), hl.end());
  };
  std::mt19937_64 rng(seed + 1);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size - 1));

  // A ragged prefill: 1, 45 and 130 tokens, every row scored. Sequence ids are the same in the
  // three pools (each starts empty), so one batch description serves all three.
  const int lens[] = {1, 45, 130};
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SeqId> seqs;
  for (int len : lens) {
    std::vector<int32_t> p(static_cast<size_t>(len));
    for (int32_t& t : p) t = tok(rng);
    prompts.push_back(std::move(p));
    const SeqId s = cpu->kv().add();
    ASSERT_EQ(gpu->kv().add(), s);
    ASSERT_EQ(cpu16->kv().add(), s);
    seqs.push_back(s);
  }
  std::vector<BatchEntry> batch;
  for (size_t i = 0; i < prompts.size(); ++i) batch.push_back({seqs[i], prompts[i], true});
  step(batch, "prefill 1+45+130");

  // Greedy decode steps (the CPU's choice fed to all), one token per sequence.
  for (int s = 0; s < 6; ++s) {
    std::vector<int32_t> next(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      const float* row = cl.data() + (s == 0 ? (std::accumulate(lens, lens + i + 1, 0) - 1) : int(i)) * c.vocab_size;
      next[i] = int32_t(std::max_element(row, row + c.vocab_size) - row);
    }
    batch.clear();
    for (size_t i = 0; i < prompts.size(); ++i) batch.push_back({seqs[i], {&next[i], 1}, false});
    step(batch, "decode step " + std::to_string(s), true);
  }
  check(dg, dc, dh, "decode steps 0-5");
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(gpu->kv().length(seqs[i]), cpu->kv().length(seqs[i]));

  // Fork the longest sequence, cut it back to 20 tokens, and continue with 17 new ones.
  const SeqId f = cpu->kv().fork(seqs[2]);
  ASSERT_EQ(gpu->kv().fork(seqs[2]), f);
  ASSERT_EQ(cpu16->kv().fork(seqs[2]), f);
  for (Executor* e : {cpu.get(), gpu.get(), cpu16.get()}) e->kv().truncate(f, 20);
  std::vector<int32_t> more(17);
  for (int32_t& t : more) t = tok(rng);
  batch = {{f, more, true}};
  step(batch, "fork + truncate + 17");
}

TEST(CudaExecutor, LlamaShapeMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(llama_like(), testing::fresh_seed());
}

TEST(CudaExecutor, Qwen2ShapeWithBiasAndTiedHeadMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(qwen2_like(), testing::fresh_seed());
}

KVFormat int4_kv(bool k_before_rope) {
  KVFormat f;
  f.bits = 4;
  f.clip = 0.9f;
  f.k_before_rope = k_before_rope;
  return f;
}

TEST(CudaExecutor, AtomW4A4WithInt4KVMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(llama_like(), testing::fresh_seed(), Weights::AtomW4A4, int4_kv(false));
}

TEST(CudaExecutor, AtomW4A4Qwen2ShapeWithKBeforeRopeMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(qwen2_like(), testing::fresh_seed(), Weights::AtomW4A4, int4_kv(true));
}

// nibble's default atom-w4a4: group-local Hadamard on weights and activations, rotated INT4 KV.
TEST(CudaExecutor, DefaultRecipeShapeWithRotationsMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  KVFormat kv = int4_kv(false);
  kv.hadamard = true;
  run_case(llama_like(), testing::fresh_seed(), Weights::AtomW4A4Rotated, kv);
  run_case(qwen2_like(), testing::fresh_seed(), Weights::AtomW4A4Rotated, kv);
}

// The recipe w8a8 (cuBLASLt INT8 GEMM), with the Qwen2 shape's q/k/v bias through its epilogue.
TEST(CudaExecutor, W8A8MatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(llama_like(), testing::fresh_seed(), Weights::W8A8);
  run_case(qwen2_like(), testing::fresh_seed(), Weights::W8A8);
}

// Every expert on every row at its routing weight (0 when not chosen) against the CPU's top-2
// dispatch; FP16 and W4A4 experts (each with its own input order) with INT4 KV.
TEST(CudaExecutor, MixtralShapeMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(mixtral_like(), testing::fresh_seed());
  run_case(mixtral_like(), testing::fresh_seed(), Weights::AtomW4A4, int4_kv(false));
}

TEST(CudaExecutor, Int4KVWithFp16WeightsMatchesCpu) {
  NIBBLE_REQUIRE_GPU();
  run_case(llama_like(), testing::fresh_seed(), Weights::Fp16, int4_kv(false));
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
  // A rotated KV cache with K before RoPE: no kernel, a refusal naming it rather than a wrong answer.
  auto ok_shape = random_model(llama_like(), 8);
  KVFormat rotated = int4_kv(true);
  rotated.hadamard = true;
  ok_shape->set_kv_format(rotated);
  try {
    make_executor(*ok_shape, o);
    ADD_FAILURE() << "a Hadamard-rotated KV cache was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Hadamard"), std::string::npos) << e.what();
  }
}

// --gpu-mem-gb: weights over the cap are refused before any allocation, saying how much they need;
// under it, the KV pool takes what the cap leaves.
TEST(CudaExecutor, MemoryCapIsHonoured) {
  NIBBLE_REQUIRE_GPU();
  auto model = random_model(llama_like(), 12);
  RuntimeOptions o;
  o.device = "cuda";
  o.max_batch_tokens = 512;
  o.gpu_mem_gb = 1e-3;  // 1 MB: less than the 4 MB of fp16 weights
  try {
    make_executor(*model, o);
    ADD_FAILURE() << "a model over --gpu-mem-gb was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("GB"), std::string::npos) << e.what();
  }
  // The cap counts what leaves the GPU's free pool during set-up, so another program allocating on
  // the same GPU meanwhile shrinks this pool (notes/gpu-executor.md): run GPU tests one at a time.
  o.gpu_mem_gb = 0.1;
  auto gpu = make_executor(*model, o);
  const double pool_gb = double(gpu->kv().capacity_tokens()) * 2 * 2 * 128 * 3 / 1e9;  // fp16 K+V, kv_dim 128, 3 layers
  std::printf("KV pool under a 0.1 GB cap: %lld tokens (%.3f GB)\n", (long long)gpu->kv().capacity_tokens(), pool_gb);
  EXPECT_GT(gpu->kv().capacity_tokens(), 512);
  EXPECT_LT(pool_gb, 0.1);
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

// Decode steps replayed as CUDA graphs against the same (padded) steps launched kernel by kernel:
// the same logits bit for bit; forward_greedy on a replay of a step gives exactly the argmax of its
// logits. The batch grows past 512 tokens (the attention's split count changes: another graph) and
// drops a sequence half-way (another graph batch).
void graphs_case(Weights weights, KVFormat kv) {
  ModelConfig c = llama_like();
  c.max_position_embeddings = 1024;
  const uint64_t seed = testing::fresh_seed();
  std::printf("seed %llu, %s, KV %s\n", (unsigned long long)seed, weights_name(weights), kv.describe().c_str());
  auto model = random_model(c, seed);
  quantize(*model, weights, seed + 2);
  model->set_kv_format(kv);
  RuntimeOptions o;
  o.device = "cuda";
  o.max_batch_tokens = 1024;
  o.kv_pages = 256;
  auto graphs = make_executor(*model, o);
  o.cuda_graphs = false;
  auto eager = make_executor(*model, o);
  std::mt19937_64 rng(seed + 1);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size - 1));
  std::vector<SeqId> seqs;
  std::vector<float> gl, el;
  for (int len : {490, 300, 7, 120, 64}) {  // 5 sequences: graph batch 8
    std::vector<int32_t> p(static_cast<size_t>(len));
    for (int32_t& t : p) t = tok(rng);
    const SeqId s = graphs->kv().add();
    ASSERT_EQ(eager->kv().add(), s);
    seqs.push_back(s);
    const BatchEntry e{s, p, false};
    graphs->forward({&e, 1}, gl);
    eager->forward({&e, 1}, el);
  }
  std::vector<int32_t> next(seqs.size(), 1), ids;
  for (int step = 0; step < 40; ++step) {
    if (step == 20) seqs.pop_back();  // 4 sequences: graph batch 4
    std::vector<BatchEntry> batch;
    for (size_t i = 0; i < seqs.size(); ++i) batch.push_back({seqs[i], {&next[i], 1}, false});
    graphs->forward(batch, gl);
    eager->forward(batch, el);
    ASSERT_EQ(gl.size(), el.size());
    size_t differ = 0;
    for (size_t i = 0; i < gl.size(); ++i) differ += gl[i] != el[i];
    EXPECT_EQ(differ, 0u) << "step " << step << ": logits differ between the replay and the launches";
    if (step % 8 == 3) {  // the same step again, greedy ids only
      for (SeqId s : seqs) graphs->kv().truncate(s, graphs->kv().length(s) - 1);
      graphs->forward_greedy(batch, ids);
      ASSERT_EQ(ids.size(), seqs.size());
      for (size_t i = 0; i < seqs.size(); ++i) {
        const float* row = gl.data() + i * size_t(c.vocab_size);
        EXPECT_EQ(ids[i], std::max_element(row, row + c.vocab_size) - row) << "step " << step << " row " << i;
      }
    }
    for (size_t i = 0; i < seqs.size(); ++i) {
      const float* row = el.data() + i * size_t(c.vocab_size);
      next[i] = int32_t(std::max_element(row, row + c.vocab_size) - row);
    }
  }
}

TEST(CudaExecutor, DecodeGraphsReplayTheLaunchesBitForBit) {
  NIBBLE_REQUIRE_GPU();
  graphs_case(Weights::Fp16, {});
  graphs_case(Weights::AtomW4A4, int4_kv(false));
  graphs_case(Weights::W8A8, {});  // cuBLASLt's INT8 GEMM inside a captured step
}

// An executor that samples on the host: the CUDA executor's forward with Executor's default
// forward_sample (the logits copied to the host, sample_rows_host).
class HostSampling final : public Executor {
 public:
  explicit HostSampling(std::unique_ptr<Executor> e) : e_(std::move(e)) {}
  const ModelConfig& config() const override { return e_->config(); }
  KVPool& kv() override { return e_->kv(); }
  std::string device_name() const override { return e_->device_name(); }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override { e_->forward(batch, logits); }

 private:
  std::unique_ptr<Executor> e_;
};

// The engine with sampling on the GPU (forward_sample's kernels) against the same engine sampling the
// same GPU's logits on the host: 24 seeded requests of every rule, batched and preempted alike, give
// the same tokens and logprobs.
TEST(CudaExecutor, EngineSamplesOnTheDeviceAsOnTheHost) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = testing::fresh_seed();
  std::printf("seed %llu\n", (unsigned long long)seed);
  const ModelConfig c = llama_like();
  auto model = random_model(c, seed);
  RuntimeOptions o;
  o.device = "cuda";
  o.max_batch_tokens = 256;
  o.kv_pages = 64;
  struct Output {
    std::vector<int32_t> ids;
    std::vector<float> logprobs;
    std::vector<int32_t> top;
  };
  auto run = [&](Executor& exec) {
    Engine engine(exec, nullptr, {.max_batch_tokens = 256});
    std::vector<Output> out(24);
    std::mt19937_64 rng(seed + 1);
    for (size_t i = 0; i < out.size(); ++i) {
      Request r;
      r.prompt.resize(size_t(5 + rng() % 60));
      for (int32_t& t : r.prompt) t = int32_t(rng() % uint64_t(c.vocab_size));
      SamplingParams& p = r.sampling;
      p.seed = rng();
      p.temperature = i % 6 == 0 ? 0.0f : 0.5f + float(i % 4) * 0.3f;
      p.top_k = i % 3 == 1 ? 20 : 0;
      p.top_p = i % 4 == 2 ? 0.85f : 1.0f;
      p.min_p = i % 5 == 3 ? 0.05f : 0.0f;
      p.repetition_penalty = i % 2 ? 1.2f : 1.0f;
      p.presence_penalty = i % 3 == 0 ? 0.5f : 0.0f;
      p.frequency_penalty = i % 4 == 0 ? 0.2f : 0.0f;
      p.logprobs = int(i % 3);
      r.stop = {.max_tokens = 24, .ignore_eos = true};
      engine.submit(std::move(r), [&out, i](const OutputEvent& ev) {
        if (ev.token.id < 0) return;
        out[i].ids.push_back(ev.token.id);
        out[i].logprobs.push_back(ev.token.logprob);
        for (const TokenLogprob& t : ev.top) out[i].top.push_back(t.id);
      });
    }
    engine.run();
    return out;
  };
  auto device_exec = make_executor(*model, o);
  HostSampling host_exec(make_executor(*model, o));
  const std::vector<Output> device = run(*device_exec), host = run(host_exec);
  for (size_t i = 0; i < host.size(); ++i) {
    ASSERT_EQ(host[i].ids.size(), 24u);
    EXPECT_EQ(device[i].ids, host[i].ids) << "request " << i;
    EXPECT_EQ(device[i].top, host[i].top) << "request " << i;
    ASSERT_EQ(device[i].logprobs.size(), host[i].logprobs.size());
    for (size_t k = 0; k < host[i].logprobs.size(); ++k) {
      if (std::isnan(host[i].logprobs[k])) {  // a plain greedy request: ids only
        EXPECT_TRUE(std::isnan(device[i].logprobs[k]));
        continue;
      }
      EXPECT_NEAR(device[i].logprobs[k], host[i].logprobs[k], 1e-5 * (1 + std::fabs(host[i].logprobs[k])))
          << "request " << i << " token " << k;
    }
  }
}

// The architecture fixtures at the GPU's shapes (tests/fixtures/*-hd64, written by transformers
// through tools/make_fixtures.py): the CUDA forward pass over every position against transformers'
// fp32 logits (fp16 weights and activations: kRelTol), and greedy generation (8 prompt tokens,
// 16 new ones, decode steps replayed as graphs) against transformers' greedy ids.
class GpuArchFixture : public ::testing::TestWithParam<const char*> {};

TEST_P(GpuArchFixture, LogitsAndGreedyIdsMatchTransformers) {
  NIBBLE_REQUIRE_GPU();
  const auto dir = test::source_dir() / "tests/fixtures" / GetParam();
  auto model = Model::load(dir);
  const Checkpoint ref = Checkpoint::open(dir / "reference.safetensors");
  const std::vector<int32_t> ids = test::load_ids(ref, "input_ids"), greedy = test::load_ids(ref, "greedy_ids");
  const std::vector<float> expected = ref.load_f32("logits");
  RuntimeOptions o;
  o.device = "cuda";
  o.max_batch_tokens = 256;
  o.kv_pages = 64;
  auto gpu = make_executor(*model, o);
  std::vector<float> got;
  const BatchEntry all{gpu->kv().add(), ids, true};
  gpu->forward({&all, 1}, got);
  const Compare r = compare(got, expected, model->config().vocab_size);
  std::printf("%s on %s: rel max %.2e, KLD %.2e, top-1 %.3f over %zu positions\n", GetParam(),
              gpu->device_name().c_str(), r.rel_max, r.kld, r.top1, ids.size());
  EXPECT_LE(r.rel_max, kRelTol);
  EXPECT_LE(r.kld, 1e-4);
  EXPECT_GE(r.top1, 0.97);
  // Greedy: the fixtures' greedy steps keep a top-1 margin of 0.02, far above fp16's error here.
  const size_t prompt = 8;
  std::vector<int32_t> out, next;
  const BatchEntry first{gpu->kv().add(), std::span<const int32_t>(ids).first(prompt), false};
  gpu->forward_greedy({&first, 1}, next);
  while (out.size() < greedy.size()) {
    out.push_back(next[0]);
    const BatchEntry step{first.seq, {&out.back(), 1}, false};
    gpu->forward_greedy({&step, 1}, next);
  }
  EXPECT_EQ(out, greedy);
}

INSTANTIATE_TEST_SUITE_P(Hd64, GpuArchFixture, ::testing::Values("llama3-rope-hd64", "mistral-hd64", "qwen2-hd64",
                                                                    "mixtral-hd64"));

// Issue 13's greedy check on the real model: 20 prompts (128-token slices of heldout.txt, BOS
// first), 64 greedy tokens each, the GPU's FP16 run against the CPU's fp32 one, all 20 in one
// batch on each; holds 90% of all tokens (fp16 may break a near-tie, after which the texts part for
// good). Also reports (issue 14) how often the GPU's batched run differs from the same prompts run
// one at a time: the CPU is batch-invariant, the GPU's GEMMs are not.
TEST(CudaExecutor, NibbleRefGreedyTokensMatchCpu) {
  NIBBLE_REQUIRE_GPU();
  NIBBLE_REQUIRE_DATA("models/nibble-ref");
  NIBBLE_REQUIRE_DATA("text/heldout.txt");
  const auto dir = test::data_dir() / "models/nibble-ref";
  auto model = Model::load(dir);
  const Tokenizer tok = Tokenizer::load(dir);
  std::ifstream in(test::data_dir() / "text/heldout.txt");
  std::stringstream text;
  text << in.rdbuf();
  const std::vector<int32_t> all = tok.encode(text.str());
  constexpr int kPrompts = 20, kPromptLen = 128, kNew = 64;
  ASSERT_GE(all.size(), size_t(kPrompts) * 1000);
  std::vector<std::vector<int32_t>> prompts;
  for (int p = 0; p < kPrompts; ++p) {
    std::vector<int32_t> ids{tok.bos_id()};
    const auto from = all.begin() + p * 1000;
    ids.insert(ids.end(), from, from + kPromptLen - 1);
    prompts.push_back(std::move(ids));
  }
  // kNew greedy tokens of prompts [first, first + count) run as one batch: out[p][step].
  using Tokens = std::vector<std::vector<int32_t>>;
  auto generate = [&](Executor& exec, int first, int count, Tokens& out) {
    std::vector<BatchEntry> batch;
    for (int p = first; p < first + count; ++p) batch.push_back({exec.kv().add(), prompts[size_t(p)], false});
    std::vector<int32_t> next, cur;
    exec.forward_greedy(batch, next);
    for (int s = 0; s < kNew; ++s) {
      for (int i = 0; i < count; ++i) out[size_t(first + i)].push_back(next[size_t(i)]);
      if (s + 1 == kNew) break;
      cur = next;
      for (int i = 0; i < count; ++i) batch[size_t(i)].tokens = {&cur[size_t(i)], 1};
      exec.forward_greedy(batch, next);
    }
    for (const BatchEntry& e : batch) exec.kv().free(e.seq);
  };
  RuntimeOptions copt, gopt;
  gopt.device = "cuda";
  gopt.max_batch_tokens = kPrompts * (kPromptLen + 1);
  gopt.kv_pages = kPrompts * (kPromptLen + kNew + 16) / 16 + 8;
  Tokens cpu(kPrompts), gpu(kPrompts), gpu_serial(kPrompts);
  generate(*make_executor(*model, copt), 0, kPrompts, cpu);
  auto exec = make_executor(*model, gopt);
  generate(*exec, 0, kPrompts, gpu);
  for (int p = 0; p < kPrompts; ++p) generate(*exec, p, 1, gpu_serial);
  // Tokens before the first difference, per prompt, and in all.
  auto agreement = [&](const Tokens& a, const Tokens& b, const char* what) {
    int agreed = 0, whole = 0;
    std::printf("%s, tokens agreeing before the first difference per prompt:", what);
    for (int p = 0; p < kPrompts; ++p) {
      const auto& x = a[size_t(p)];
      const int n = int(std::mismatch(x.begin(), x.end(), b[size_t(p)].begin()).first - x.begin());
      std::printf(" %d", n);
      agreed += n;
      whole += n == kNew;
    }
    std::printf("\n  %d of %d prompts agree on all %d tokens; %d of %d tokens\n", whole, kPrompts, kNew, agreed,
                kPrompts * kNew);
    return agreed;
  };
  EXPECT_GE(agreement(gpu, cpu, "GPU FP16 batch of 20 vs CPU fp32"), kPrompts * kNew * 9 / 10);
  agreement(gpu, gpu_serial, "GPU batch of 20 vs GPU one prompt at a time");
}

// What the kernels cannot run is refused at load, naming why and pointing at the CPU, never run
// wrongly: head_dim 8 (stories260K) and 16 (the small fixtures).
TEST(CudaExecutor, ModelsWithoutKernelsAreRefusedByName) {
  NIBBLE_REQUIRE_GPU();
  RuntimeOptions o;
  o.device = "cuda";
  o.kv_pages = 64;
  auto refused = [&](const std::filesystem::path& dir, const std::string& why) {
    auto model = Model::load(dir);
    try {
      make_executor(*model, o);
      ADD_FAILURE() << dir << " was accepted";
    } catch (const Error& e) {
      std::printf("%s: %s\n", dir.filename().c_str(), e.what());
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("--device cpu"), std::string::npos) << e.what();
    }
  };
  refused(test::source_dir() / "tests/fixtures/mixtral", "head_dim");
  refused(test::source_dir() / "tests/fixtures/qwen2", "head_dim");
  NIBBLE_REQUIRE_DATA("models/stories260K");
  refused(test::data_dir() / "models/stories260K", "head_dim");
}

}  // namespace
}  // namespace nibble
