// Random Llama-family models for the GPU tests (the executor's, the calibration stream's, tensor
// parallelism's) and their RTN W4A4 forms: weights rounded to fp16 so that the GPU holds exactly
// the CPU's values.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "nibble/core/half.h"
#include "nibble/model/model.h"
#include "nibble/quant/quant_linear.h"

namespace nibble {

// Uniform values of scale `range`, rounded to fp16 so the GPU holds exactly the CPU's weights.
inline std::vector<float> random_fp16(std::mt19937_64& rng, int64_t n, float range) {
  std::uniform_real_distribution<float> u(-range, range);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = round_fp16(u(rng));
  return v;
}

inline std::unique_ptr<Linear> random_linear(std::mt19937_64& rng, int64_t in, int64_t out, bool bias) {
  const float range = std::sqrt(3.0f / float(in));  // unit variance out for unit variance in
  return std::make_unique<DenseLinear>(in, out, random_fp16(rng, in * out, range),
                                       bias ? random_fp16(rng, out, 0.5f) : std::vector<float>{});
}

inline std::unique_ptr<Model> random_model(const ModelConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto norm = [&](int64_t n) {
    std::vector<float> w = random_fp16(rng, n, 0.2f);
    for (float& x : w) x = round_fp16(1.0f + x);
    return w;
  };
  // A tied head scores a token by its embedding's dot product with the last hidden state, which is
  // mostly that token's own embedding: a large one makes the model repeat its input, every decode
  // row then holds the same peaked distribution, and a single near-tie fails all steps at once. Keep
  // it small there (as the fixtures do).
  std::vector<float> embedding = random_fp16(rng, c.vocab_size * c.hidden_size, c.tie_word_embeddings ? 0.25f : 1.0f);
  std::vector<Layer> layers;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer layer;
    layer.attn_norm = norm(c.hidden_size);
    layer.mlp_norm = norm(c.hidden_size);
    layer.qkv = random_linear(rng, c.hidden_size, c.q_dim() + 2 * c.kv_dim(), c.attention_bias);
    layer.o = random_linear(rng, c.q_dim(), c.hidden_size, false);
    for (int64_t e = 0; e < std::max<int64_t>(c.num_experts, 1); ++e)
      layer.experts.push_back({random_linear(rng, c.hidden_size, 2 * c.intermediate_size, false),
                               random_linear(rng, c.intermediate_size, c.hidden_size, false)});
    // Router scores of spread ~8 (not 1): the GPU's residual differs from the CPU's by fp16 rounding,
    // and a choice between two experts closer than that flips, which no tolerance can absorb.
    if (c.num_experts > 0)
      layer.router = std::make_unique<DenseLinear>(
          c.hidden_size, c.num_experts, random_fp16(rng, c.num_experts * c.hidden_size, 8 * std::sqrt(3.0f / float(c.hidden_size))));
    layers.push_back(std::move(layer));
  }
  std::unique_ptr<Linear> head =
      c.tie_word_embeddings ? std::make_unique<DenseLinear>(c.hidden_size, c.vocab_size, embedding)
                            : random_linear(rng, c.hidden_size, c.vocab_size, false);
  return std::make_unique<Model>(c, "random", std::move(embedding), std::move(layers), norm(c.hidden_size),
                                 std::move(head));
}

inline ModelConfig llama_like() {
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

// Atom's W4A4 form: the last 128 input channels INT8 keepers, INT4 groups of 128 for weights and
// per-token activations.
inline quant::LinearQuantSpec atom_spec(bool group_hadamard) {
  using namespace quant;
  LinearQuantSpec spec;
  spec.group_hadamard = group_hadamard;
  spec.weight = {Format::Int4Sym, 128, 1, 0.85f};
  spec.act = FormatSpec{Format::Int4Sym, 128, 1, 0.9f};
  spec.keeper = 128;
  spec.keeper_precision = KeeperPrecision::Int8;
  return spec;
}

// Replaces every linear of the layers with its RTN quantization by `spec`, input channels in a
// random order (the GPU gathers them as the CPU does). permute_down false leaves down_proj's in
// order, as the quantizer does (it folds down_proj's order into gate/up's rows).
inline void quantize_layers(Model& m, uint64_t seed, const quant::LinearQuantSpec& spec, bool permute_down = true) {
  using namespace quant;
  std::mt19937_64 rng(seed);
  auto convert = [&](std::unique_ptr<Linear>& l, bool permuted) {
    const auto& d = dynamic_cast<const DenseLinear&>(*l);
    const int64_t N = d.out_features(), K = d.in_features();
    std::vector<int32_t> perm(static_cast<size_t>(K));
    std::iota(perm.begin(), perm.end(), 0);
    if (permuted) std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<float> w(d.weight().size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < K; ++c) w[size_t(n * K + c)] = d.weight()[size_t(n * K + perm[size_t(c)])];
    l = quantize_linear_rtn(w, N, K, spec, permuted ? perm : std::vector<int32_t>{}, d.bias(), "test");
  };
  for (Layer& layer : m.layers()) {
    convert(layer.qkv, true);
    convert(layer.o, true);
    for (Expert& e : layer.experts) {
      convert(e.gate_up, true);
      convert(e.down, permute_down);
    }
  }
}

}  // namespace nibble
