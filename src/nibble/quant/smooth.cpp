#include "nibble/quant/smooth.h"

#include <algorithm>
#include <cmath>

#include "nibble/core/error.h"
#include "nibble/quant/quantize_model.h"

namespace nibble::quant {

std::vector<double> smoothing_scales(const std::vector<double>& sum_sq, int64_t count, const std::vector<float>& w,
                                     int64_t N, int64_t K, double alpha, int64_t keeper) {
  check(int64_t(sum_sq.size()) == K && int64_t(w.size()) == N * K && count > 0, "smoothing",
        "statistics of {} channels over {} rows for a [{}, {}] weight", sum_sq.size(), count, N, K);
  std::vector<double> wmax(size_t(K), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K; ++c) wmax[size_t(c)] = std::max(wmax[size_t(c)], double(std::abs(w[size_t(n * K + c)])));
  std::vector<double> s(size_t(K), 1.0);
  const std::vector<int32_t> order = salience_order(sum_sq);  // ascending: the keepers last
  double log_sum = 0;
  int64_t smoothed = 0;
  for (int64_t i = 0; i < K - keeper; ++i) {
    const auto c = size_t(order[size_t(i)]);
    if (sum_sq[c] <= 0 || wmax[c] <= 0) continue;
    s[c] = std::pow(std::sqrt(sum_sq[c] / double(count)), alpha) / std::pow(wmax[c], 1 - alpha);
    log_sum += std::log(s[c]);
    ++smoothed;
  }
  const double norm = smoothed ? std::exp(log_sum / double(smoothed)) : 1.0;
  for (int64_t i = 0; i < K - keeper; ++i) {
    const auto c = size_t(order[size_t(i)]);
    if (sum_sq[c] > 0 && wmax[c] > 0) s[c] /= norm;
  }
  return s;
}

namespace {
DenseLinear& dense_linear(Linear& l, const char* what) {
  auto* d = dynamic_cast<DenseLinear*>(&l);
  check(d != nullptr, "smoothing", "{} is already quantized", what);
  return *d;
}

void scale_columns(DenseLinear& d, const std::vector<double>& s) {
  const int64_t N = d.out_features(), K = d.in_features();
  check(int64_t(s.size()) == K, "smoothing", "{} scales for {} input channels", s.size(), K);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K; ++c) d.weight()[size_t(n * K + c)] = float(d.weight()[size_t(n * K + c)] * s[size_t(c)]);
}
}  // namespace

void fold_input_scales(Layer& layer, LinearSlot slot, const std::vector<double>& s, int64_t intermediate) {
  check(layer.experts.size() == 1 && !layer.router, "smoothing", "not implemented for mixture-of-experts layers");
  auto divide = [&](std::vector<float>& v, size_t offset) {
    for (size_t c = 0; c < s.size(); ++c) v[offset + c] = float(v[offset + c] / s[c]);
  };
  switch (slot) {
    case LinearSlot::QKV:
      divide(layer.attn_norm, 0);
      scale_columns(dense_linear(*layer.qkv, "q/k/v"), s);
      break;
    case LinearSlot::GateUp:
      divide(layer.mlp_norm, 0);
      scale_columns(dense_linear(*layer.experts[0].gate_up, "gate/up"), s);
      break;
    case LinearSlot::Down: {
      DenseLinear& gu = dense_linear(*layer.experts[0].gate_up, "gate/up");
      const int64_t H = gu.in_features();
      check(int64_t(s.size()) == intermediate && gu.bias().empty(), "smoothing",
            "down_proj's input is scaled through bias-free up rows ({} scales, intermediate {})", s.size(), intermediate);
      for (int64_t i = 0; i < intermediate; ++i)  // SwiGLU is linear in up: silu(g)·(u / s) = (silu(g)·u) / s
        for (int64_t h = 0; h < H; ++h) {
          float& v = gu.weight()[size_t((intermediate + i) * H + h)];
          v = float(v / s[size_t(i)]);
        }
      scale_columns(dense_linear(*layer.experts[0].down, "down_proj"), s);
      break;
    }
    default:
      throw Error("smoothing", fmt::format("no fold for the input of {}", linear_slot_name(slot)));
  }
}

}  // namespace nibble::quant
