#include "nibble/backend/cpu/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "nibble/core/half.h"

namespace nibble::cpu {

float dot(const float* a, const float* b, int64_t n) {
  // Eight independent partial sums: vectorizes without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

namespace {

constexpr int64_t kTile = 256;

// Calls fn(i0, rows, j0, cols) for every kTile x kTile tile of an [M, N] output (upper_only: the
// tiles that reach the upper triangle), in parallel. BLAS inside runs single-threaded: OpenBLAS
// (OpenMP build) does so inside an active parallel region, and with one OpenMP thread anyway.
template <typename Fn>
void for_each_tile(int64_t M, int64_t N, bool upper_only, const Fn& fn) {
  const int64_t row_tiles = (M + kTile - 1) / kTile, col_tiles = (N + kTile - 1) / kTile;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t t = 0; t < row_tiles * col_tiles; ++t) {
    const int64_t i0 = t / col_tiles * kTile, j0 = t % col_tiles * kTile;
    if (upper_only && i0 > j0) continue;
    fn(i0, std::min(kTile, M - i0), j0, std::min(kTile, N - j0));
  }
}

}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* x, const float* w, float beta, float* y) {
  for_each_tile(M, N, false, [&](int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(cols), int(K), 1.0f, x + i0 * K, int(K),
                w + j0 * K, int(K), beta, y + i0 * N + j0, int(N));
  });
}

void gram_upper(const float* x, int64_t rows, int64_t dim, float* out) {
  for_each_tile(dim, dim, true, [&](int64_t i0, int64_t m, int64_t j0, int64_t n) {
    float* tile = out + i0 * dim + j0;
    if (i0 == j0)
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, int(m), int(rows), 1.0f, x + i0, int(dim), 0.0f, tile,
                  int(dim));
    else
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(m), int(n), int(rows), 1.0f, x + i0, int(dim), x + j0,
                  int(dim), 0.0f, tile, int(dim));
  });
}

void rms_norm(const float* x, const float* weight, int64_t rows, int64_t n, double eps, float* out, bool fp16) {
#pragma omp parallel for if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    const float ms = dot(xr, xr, n) / float(n);
    const float inv = 1.0f / std::sqrt(ms + float(eps));
    if (fp16)  // Hugging Face: weight * (x * inv).to(fp16), the product in fp16 again
      for (int64_t i = 0; i < n; ++i) out[r * n + i] = round_fp16(weight[i] * round_fp16(xr[i] * inv));
    else
      for (int64_t i = 0; i < n; ++i) out[r * n + i] = weight[i] * (xr[i] * inv);
  }
}

std::vector<double> rope_inv_freq(const ModelConfig& c) {
  // In fp32, step by step as transformers computes them: the frequencies a checkpoint was trained
  // and evaluated with, and what an fp16 model (--atom-compat) rotates by.
  const int64_t d = c.head_dim;
  std::vector<float> inv(size_t(d / 2));
  for (int64_t i = 0; i < d / 2; ++i)
    inv[size_t(i)] = 1.0f / std::pow(float(c.rope_theta), float(2 * i) / float(d));
  if (c.rope_scaling.type == "llama3") {
    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    const auto& s = c.rope_scaling;
    const float factor = float(s.factor), low = float(s.low_freq_factor), high = float(s.high_freq_factor);
    const float old_len = float(s.original_max_position_embeddings);
    const float low_freq_wavelen = float(double(s.original_max_position_embeddings) / s.low_freq_factor);
    const float high_freq_wavelen = float(double(s.original_max_position_embeddings) / s.high_freq_factor);
    for (float& f : inv) {
      const float wavelen = float(2 * std::numbers::pi) / f;
      if (wavelen > low_freq_wavelen) {
        f = f / factor;
      } else if (wavelen >= high_freq_wavelen) {
        const float smooth = (old_len / wavelen - low) / (high - low);
        f = (1 - smooth) * f / factor + smooth * f;
      }
    }
  }
  return std::vector<double>(inv.begin(), inv.end());
}

void apply_rope(float* x, int64_t heads, int64_t head_dim, int64_t pos, std::span<const double> inv_freq,
                bool fp16) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    if (fp16) {
      // Hugging Face: the angle in fp32, cos/sin cast to fp16, x*cos + rotate_half(x)*sin by fp16 steps.
      const float angle = float(pos) * float(inv_freq[size_t(i)]);
      const float c = round_fp16(std::cos(angle)), s = round_fp16(std::sin(angle));
      for (int64_t h = 0; h < heads; ++h) {
        float* xh = x + h * head_dim;
        const float a = xh[i], b = xh[i + half];
        xh[i] = round_fp16(round_fp16(a * c) + round_fp16(-b * s));
        xh[i + half] = round_fp16(round_fp16(b * c) + round_fp16(a * s));
      }
      continue;
    }
    const double angle = double(pos) * inv_freq[size_t(i)];
    const float c = float(std::cos(angle)), s = float(std::sin(angle));
    for (int64_t h = 0; h < heads; ++h) {
      float* xh = x + h * head_dim;
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * c - b * s;
      xh[i + half] = b * c + a * s;
    }
  }
}

void attention(const float* q, const float* k, const float* v, int64_t n, int64_t start, int64_t heads,
               int64_t kv_heads, int64_t d, int64_t sliding_window, float* out, bool fp16) {
  const int64_t group = heads / kv_heads;
  const int64_t q_stride = heads * d, kv_stride = kv_heads * d;
  const float scale = 1.0f / std::sqrt(float(d));
  // Per head and block of query rows: S = Q Kᵀ / sqrt(d) through BLAS over only the keys the
  // block can see (causal: about half the products of the full square in a long prefill), the
  // mask, row softmax, O = P V through BLAS. (head, block) pairs run in parallel; BLAS runs
  // single-threaded inside the region, which is why it opens even for one pair (see gemm_nt).
  constexpr int64_t kRows = 128;
  const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i0 = b * kRows, rows = std::min(kRows, n - i0);
      const int64_t end = start + i0 + rows;  // keys [lo, end) are visible to some row of the block
      const int64_t lo = sliding_window > 0 ? std::max<int64_t>(0, start + i0 - sliding_window + 1) : 0;
      const int64_t keys = end - lo;
      const float* kh = k + lo * kv_stride + (h / group) * d;
      const float* vh = v + lo * kv_stride + (h / group) * d;
      std::vector<float> scores(static_cast<size_t>(rows * keys));
      // fp16 (Hugging Face eager): Q Kᵀ stored in fp16, then scaled in fp16; softmax in fp32, its
      // probabilities stored in fp16; P V stored in fp16.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(rows), int(keys), int(d), fp16 ? 1.0f : scale,
                  q + i0 * q_stride + h * d, int(q_stride), kh, int(kv_stride), 0.0f, scores.data(), int(keys));
      if (fp16)
        for (float& x : scores) x = round_fp16(round_fp16(x) * scale);
      for (int64_t i = 0; i < rows; ++i) {
        float* row = scores.data() + i * keys;
        const int64_t pos = start + i0 + i;  // sees keys [first, pos]
        const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
        std::fill(row, row + (first - lo), 0.0f);
        softmax(row + (first - lo), pos + 1 - first);
        std::fill(row + (pos + 1 - lo), row + keys, 0.0f);
      }
      if (fp16) round_fp16(scores.data(), int64_t(scores.size()));
      float* oh = out + i0 * q_stride + h * d;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(rows), int(d), int(keys), 1.0f, scores.data(),
                  int(keys), vh, int(kv_stride), 0.0f, oh, int(q_stride));
      if (fp16)
        for (int64_t i = 0; i < rows; ++i) round_fp16(oh + i * q_stride, d);
    }
}

void swiglu(const float* gate_up, int64_t rows, int64_t inter, float* out, bool fp16) {
#pragma omp parallel for if (rows > 16)
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    if (fp16)  // silu(gate) stored in fp16, then the product
      for (int64_t i = 0; i < inter; ++i) out[r * inter + i] = round_fp16(round_fp16(g[i] / (1.0f + std::exp(-g[i]))) * u[i]);
    else
      for (int64_t i = 0; i < inter; ++i) out[r * inter + i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void softmax(float* x, int64_t n) {
  const float mx = *std::max_element(x, x + n);
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  for (int64_t i = 0; i < n; ++i) x[i] /= sum;
}

}  // namespace nibble::cpu
