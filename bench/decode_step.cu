// The decode step of the whole model on the GPU (issue 13's table): for each batch × context,
// `batch` sequences are prefilled to `context` tokens (timed: prefill tokens/s), then decode steps of
// one token per sequence are timed (median of --steps, wall clock around Executor::forward_greedy:
// the greedy ids to the host included, each step's ids the next step's tokens). --eager launches
// every kernel instead of replaying the step's CUDA graph.
// The roofline is the bytes one step must read (every weight once + every cached K/V byte) over the
// device's copy bandwidth, measured in the same run.
//   bench_decode_step [-m MODEL | --like llama-2-7b|llama-2-70b|...] [--layers N] [--batch 1,16,64,256]
//                     [--ctx 512,2048] [--steps 20] [--eager]
// MODEL: any model nibble loads (`nibble synth` writes random-weight ones of real shapes, FP16 or
// packed); without -m, FP16 random weights of the --like shape are made in memory.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench_cuda.cuh"
#include "nibble/backend/backend.h"
#include "nibble/core/error.h"
#include "nibble/core/progress.h"
#include "nibble/model/model.h"
#include "nibble/quant/synth.h"

using namespace nibble;

namespace {

// Uniform values in [-range, range), filled in parallel from a counter-based hash.
std::vector<float> random_values(int64_t n, float range, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(n));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = range * (2.0f * bench::unit(seed, uint64_t(i)) - 1.0f);
  return v;
}

std::unique_ptr<Linear> random_linear(int64_t in, int64_t out, uint64_t seed) {
  return std::make_unique<DenseLinear>(in, out, random_values(in * out, std::sqrt(3.0f / float(in)), seed));
}

std::unique_ptr<Model> random_model(const ModelConfig& c) {
  std::vector<Layer> layers;
  uint64_t seed = 1;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer layer;
    layer.attn_norm.assign(size_t(c.hidden_size), 1.0f);
    layer.mlp_norm.assign(size_t(c.hidden_size), 1.0f);
    layer.qkv = random_linear(c.hidden_size, c.q_dim() + 2 * c.kv_dim(), seed++);
    layer.o = random_linear(c.q_dim(), c.hidden_size, seed++);
    layer.experts.push_back({random_linear(c.hidden_size, 2 * c.intermediate_size, seed++),
                             random_linear(c.intermediate_size, c.hidden_size, seed++)});
    layers.push_back(std::move(layer));
  }
  return std::make_unique<Model>(c, "random", random_values(c.vocab_size * c.hidden_size, 1.0f, seed + 1),
                                 std::move(layers), std::vector<float>(size_t(c.hidden_size), 1.0f),
                                 random_linear(c.hidden_size, c.vocab_size, seed + 2));
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  for (const char* p = s; *p;) {
    v.push_back(std::atoi(p));
    p = std::strchr(p, ',');
    if (!p) break;
    ++p;
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string like = "llama-2-7b", model_path;
  int layers = 0, steps = 20;
  bool graphs = true;
  std::vector<int> batches = {1, 16, 64, 256}, contexts = {512, 2048};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : "";
    if (a == "--like") like = v, ++i;
    else if (a == "-m") model_path = v, ++i;
    else if (a == "--layers") layers = std::atoi(v), ++i;
    else if (a == "--batch") batches = parse_list(v), ++i;
    else if (a == "--ctx") contexts = parse_list(v), ++i;
    else if (a == "--steps") steps = std::atoi(v), ++i;
    else if (a == "--eager") graphs = false;
    else throw Error("bench_decode_step", "unknown argument '" + a + "' (see the comment at the top of decode_step.cu)");
  }
  cudaDeviceProp prop{};
  NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbs = bench::copy_bandwidth();
  auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Model> model;
  if (model_path.empty()) {
    ModelConfig shape = quant::synthetic_shape(like).config;
    if (layers > 0) shape.num_layers = layers;
    model = random_model(shape);
  } else {
    model = Model::load(model_path);
    like = model_path;
  }
  const ModelConfig c = model->config();
  std::fprintf(stderr, "model: %.1f s\n", seconds_since(t0));
  // The GPU keeps K/V as INT4 or fp16 (an fp32 cache format runs as fp16 there).
  std::printf("# decode step, %s (%lld layers), %s weights, KV %s, %s; %s, copy %.0f GB/s\n", like.c_str(),
              (long long)c.num_layers, model->metadata().count("nibble.recipe") ? "packed" : "FP16",
              model->kv_format().bits == 4 ? model->kv_format().describe().c_str() : "fp16",
              graphs ? "CUDA graphs" : "eager launches", prop.name, copy_gbs);
  t0 = std::chrono::steady_clock::now();
  RuntimeOptions opt;
  opt.device = "cuda";
  opt.max_batch_tokens = 4096;
  opt.cuda_graphs = graphs;
  opt.max_context = *std::max_element(contexts.begin(), contexts.end()) + steps + 8;
  auto exec = make_executor(*model, opt);
  std::fprintf(stderr, "upload: %.1f s; KV pool %lld tokens\n", seconds_since(t0),
               (long long)exec->kv().capacity_tokens());
  const double weight_bytes = double(model->storage_bytes());
  // Bytes one cached token takes in every layer: fp16 K and V, or INT4 codes + fp16 scale + u8 zero
  // per token and head (kv_cache_paged.h's INT4 chunk).
  const bool int4 = model->kv_format().bits == 4;
  const double kv_token_bytes =
      double(c.num_layers * c.num_kv_heads) * (int4 ? 2.0 * (double(c.head_dim) / 2 + 3) : 4.0 * double(c.head_dim));
  model.reset();  // the GPU holds its own copy

  std::printf("| batch | context | ms/step | tokens/s | bytes/step (GB) | roofline ms | roofline / measured | prefill "
              "tokens/s |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (int ctx : contexts) {
    for (int batch : batches) {
      const double need = double(batch) * double(ctx + steps + 1);
      if (need > double(exec->kv().free_tokens())) {
        std::printf("| %d | %d | does not fit (KV pool %lld tokens) | | | | | |\n", batch, ctx,
                    (long long)exec->kv().free_tokens());
        continue;
      }
      std::vector<SeqId> seqs;
      std::vector<int32_t> prompt(static_cast<size_t>(ctx));
      for (int i = 0; i < ctx; ++i) prompt[size_t(i)] = int32_t(bench::hash32(uint64_t(i)) % uint32_t(c.vocab_size));
      // Prefill: whole prompts, as many per forward as fit in max_batch_tokens (one chunked
      // prompt when a prompt alone does not).
      std::vector<int32_t> next;
      const auto tp = std::chrono::steady_clock::now();
      for (int b = 0; b < batch; ++b) seqs.push_back(exec->kv().add());
      for (int b = 0; b < batch;) {
        std::vector<BatchEntry> step;
        for (int64_t tokens = 0; b < batch && tokens + ctx <= opt.max_batch_tokens; ++b, tokens += ctx)
          step.push_back({seqs[size_t(b)], prompt, false});
        if (step.empty()) {  // a prompt longer than one step
          for (int p = 0; p < ctx; p += int(opt.max_batch_tokens)) {
            const BatchEntry e{seqs[size_t(b)], std::span<const int32_t>(prompt).subspan(
                                                    size_t(p), size_t(std::min<int64_t>(opt.max_batch_tokens, ctx - p))),
                               false};
            exec->forward_greedy({&e, 1}, next);
          }
          ++b;
          continue;
        }
        exec->forward_greedy(step, next);
      }
      const double prefill_s = seconds_since(tp);
      // Decode: the greedy ids of each step are the next step's tokens.
      next.assign(size_t(batch), 7);
      std::vector<BatchEntry> step;
      for (int b = 0; b < batch; ++b) step.push_back({seqs[size_t(b)], {&next[size_t(b)], 1}, false});
      std::vector<double> ms;
      std::vector<int32_t> ids;
      for (int s = 0; s < steps + 3; ++s) {
        const auto t = std::chrono::steady_clock::now();
        exec->forward_greedy(step, ids);
        if (s >= 3) ms.push_back(1e3 * seconds_since(t));
        std::copy(ids.begin(), ids.end(), next.begin());
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      const double bytes = weight_bytes + double(batch) * double(ctx) * kv_token_bytes;
      const double roof = bytes / (copy_gbs * 1e9) * 1e3;
      std::printf("| %d | %d | %.3f | %.0f | %.2f | %.3f | %.2f | %.0f |\n", batch, ctx, med, 1e3 * batch / med,
                  bytes / 1e9, roof, roof / med, double(batch) * ctx / prefill_s);
      std::fflush(stdout);
      for (SeqId s : seqs) exec->kv().free(s);
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_decode_step: error: %s\n", e.what());
  return 1;
}
