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

std::vector<double> key_smoothing_scales(const std::vector<double>& xtx, int64_t count, const std::vector<float>& qkv,
                                         const ModelConfig& c, double alpha) {
  const int64_t H = c.hidden_size, hd = c.head_dim, half = hd / 2, kvd = c.kv_dim();
  check(int64_t(xtx.size()) == H * H && int64_t(qkv.size()) == (c.q_dim() + 2 * kvd) * H && count > 0,
        "key smoothing", "XᵀX of {} entries and a q/k/v weight of {} for hidden {}", xtx.size(), qkv.size(), H);
  std::vector<double> energy(static_cast<size_t>(kvd)), hw(static_cast<size_t>(H));
  for (int64_t r = 0; r < kvd; ++r) {
    const float* w = qkv.data() + (c.q_dim() + r) * H;
    std::fill(hw.begin(), hw.end(), 0.0);
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < H; ++j) hw[size_t(i)] += xtx[size_t(i * H + j)] * w[j];
    for (int64_t i = 0; i < H; ++i) energy[size_t(r)] += double(w[i]) * hw[size_t(i)];
    energy[size_t(r)] /= double(count);
  }
  std::vector<double> lambda(size_t(kvd), 1.0);
  for (int64_t g = 0; g < c.num_kv_heads; ++g) {
    double log_sum = 0;
    for (int64_t i = 0; i < half; ++i) {
      const double pair = (energy[size_t(g * hd + i)] + energy[size_t(g * hd + i + half)]) / 2;
      const double l = pair > 0 ? std::pow(pair, alpha / 2) : 1.0;
      lambda[size_t(g * hd + i)] = lambda[size_t(g * hd + i + half)] = l;
      log_sum += std::log(l);
    }
    const double norm = std::exp(log_sum / double(half));
    for (int64_t i = 0; i < hd; ++i) lambda[size_t(g * hd + i)] /= norm;
  }
  return lambda;
}

void fold_key_scales(Layer& layer, const ModelConfig& c, const std::vector<double>& lambda) {
  DenseLinear& d = dense_linear(*layer.qkv, "q/k/v");
  const int64_t H = d.in_features(), hd = c.head_dim, kvd = c.kv_dim(), per_group = c.num_heads / c.num_kv_heads;
  check(int64_t(lambda.size()) == kvd, "key smoothing", "{} scales for {} K channels", lambda.size(), kvd);
  auto scale_row = [&](int64_t row, double f) {
    for (int64_t h = 0; h < H; ++h) d.weight()[size_t(row * H + h)] = float(d.weight()[size_t(row * H + h)] * f);
    if (!d.bias().empty()) d.bias()[size_t(row)] = float(d.bias()[size_t(row)] * f);
  };
  for (int64_t r = 0; r < kvd; ++r) {
    scale_row(c.q_dim() + r, 1 / lambda[size_t(r)]);
    const int64_t g = r / hd, i = r % hd;
    for (int64_t h = g * per_group; h < (g + 1) * per_group; ++h) scale_row(h * hd + i, lambda[size_t(r)]);
  }
}

}  // namespace nibble::quant
