#include "nibble/backend/cpu/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

namespace {

using Lanes = float __attribute__((vector_size(32)));  // 8 floats: AVX2 on x86-64-v3
constexpr int kBlockRows = 4, kBlockCols = 2;

Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[r][c] = x[r] · w[c] for a block of 4 rows and 2 columns. Every element is summed the same
// way whatever block it sits in: 8 lanes over k stepping by 8, a fixed reduction of the lanes, the
// tail in order. A row's products are then a function of the row alone (batch invariance).
void dot_block(const float* const x[kBlockRows], const float* const w[kBlockCols], int64_t K,
               float out[kBlockRows][kBlockCols]) {
  Lanes acc[kBlockRows][kBlockCols] = {};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    Lanes wv[kBlockCols];
    for (int c = 0; c < kBlockCols; ++c) wv[c] = load_lanes(w[c] + k);
    for (int r = 0; r < kBlockRows; ++r) {
      const Lanes xv = load_lanes(x[r] + k);
      for (int c = 0; c < kBlockCols; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < kBlockRows; ++r)
    for (int c = 0; c < kBlockCols; ++c) {
      const Lanes& a = acc[r][c];
      float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));  // as dot()
      for (int64_t t = k; t < K; ++t) s += x[r][t] * w[c][t];
      out[r][c] = s;
    }
}

}  // namespace

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* x, const float* w, float beta, float* y) {
  // Tiles of 64 x 64 outputs in parallel; inside, blocks of 4 x 2 through dot_block. A block past
  // the last row or column repeats that row or column and stores nothing for it, so edge blocks
  // run the very same arithmetic.
  constexpr int64_t kRowTile = 64, kColTile = 64;
  const int64_t row_tiles = (M + kRowTile - 1) / kRowTile, col_tiles = (N + kColTile - 1) / kColTile;
#pragma omp parallel for schedule(dynamic, 1) if (M * N * K > 1 << 16)
  for (int64_t t = 0; t < row_tiles * col_tiles; ++t) {
    const int64_t i_end = std::min(M, (t / col_tiles + 1) * kRowTile), j_end = std::min(N, (t % col_tiles + 1) * kColTile);
    for (int64_t i0 = t / col_tiles * kRowTile; i0 < i_end; i0 += kBlockRows)
      for (int64_t j0 = t % col_tiles * kColTile; j0 < j_end; j0 += kBlockCols) {
        const float* xr[kBlockRows];
        const float* wr[kBlockCols];
        for (int r = 0; r < kBlockRows; ++r) xr[r] = x + std::min(i0 + r, M - 1) * K;
        for (int c = 0; c < kBlockCols; ++c) wr[c] = w + std::min(j0 + c, N - 1) * K;
        float out[kBlockRows][kBlockCols];
        dot_block(xr, wr, K, out);
        for (int r = 0; r < kBlockRows && i0 + r < i_end; ++r)
          for (int c = 0; c < kBlockCols && j0 + c < j_end; ++c) {
            float& dst = y[(i0 + r) * N + j0 + c];
            dst = beta == 0 ? out[r][c] : out[r][c] + beta * dst;
          }
      }
  }
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
  // Per head and query row: scores over the keys the row sees (causal, sliding window), softmax,
  // then the weighted sum of values in key order. Each row's result depends on its own keys only,
  // not on how many rows share the call (prefill chunks, batches): see gemm_nt.
  // (head, block of rows) pairs run in parallel.
  constexpr int64_t kRows = 32;
  const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) if (heads * n * (start + n) * d > 1 << 16)
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t b = 0; b < blocks; ++b) {
      const float* kh = k + (h / group) * d;
      const float* vh = v + (h / group) * d;
      std::vector<float> p(static_cast<size_t>(start + n));
      for (int64_t i = b * kRows; i < std::min(n, (b + 1) * kRows); ++i) {
        const int64_t pos = start + i;  // sees keys [first, pos]
        const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
        const float* qi = q + i * q_stride + h * d;
        // fp16 (Hugging Face eager): Q Kᵀ stored in fp16, then scaled in fp16; softmax in fp32, its
        // probabilities stored in fp16; P V stored in fp16.
        for (int64_t j = first; j <= pos; ++j) {
          const float s = dot(qi, kh + j * kv_stride, d);
          p[size_t(j)] = fp16 ? round_fp16(round_fp16(s) * scale) : s * scale;
        }
        float* pr = p.data() + first;
        softmax(pr, pos + 1 - first);
        if (fp16) round_fp16(pr, pos + 1 - first);
        float* oh = out + i * q_stride + h * d;
        std::fill(oh, oh + d, 0.0f);
        for (int64_t j = first; j <= pos; ++j) {
          const float* vj = vh + j * kv_stride;
          for (int64_t e = 0; e < d; ++e) oh[e] += p[size_t(j)] * vj[e];
        }
        if (fp16) round_fp16(oh, d);
      }
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
