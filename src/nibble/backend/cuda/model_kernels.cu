#include "nibble/backend/cuda/model_kernels.h"

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/hadamard_device.cuh"
#include "nibble/backend/cuda/warp_best.cuh"
#include "nibble/backend/sampling.h"

#include <algorithm>

namespace nibble::cuda {

namespace {

// Row kernels (a reduction over a row) take a block of kRowThreads per row: at batch 1 one block
// is all the GPU gets, and its latency is the kernel's time, so it must be wide. Elementwise
// kernels run flat over rows × width with kThreads per block.
constexpr int kRowThreads = 1024, kThreads = 256;

// Blocks for `total` elementwise items (a grid-stride loop takes the rest).
unsigned flat_blocks(int64_t total) { return unsigned(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16)); }

#define NIBBLE_FLAT_LOOP(i, total) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (total); i += int64_t(gridDim.x) * blockDim.x)

__global__ void embed_kernel(const int32_t* tokens, int64_t n, const __half* table, int64_t first, int64_t table_rows,
                             int64_t H, float* h) {
  NIBBLE_FLAT_LOOP(i, n * H) {
    const int64_t row = int64_t(tokens[i / H]) - first;
    h[i] = row >= 0 && row < table_rows ? __half2float(table[row * H + i % H]) : 0.0f;
  }
}

template <typename T>
__global__ void rank_columns_kernel(const T* parts, int64_t rows, int64_t width, int64_t cols, T* out) {
  NIBBLE_FLAT_LOOP(i, rows * cols) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = parts[(c / width) * rows * width + r * width + c % width];
  }
}

__device__ float block_sum(float v) {
  __shared__ float partial[kRowThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0;
  for (int w = 0; w < kRowThreads / 32; ++w) total += partial[w];
  __syncthreads();  // partial is reused by the next call
  return total;
}

__global__ void __launch_bounds__(kRowThreads) residual_rmsnorm_kernel(float* h, const __half* y, int64_t H,
                                                                       const float* w, float eps, __half* out,
                                                                       __half* h16) {
  float* row = h + blockIdx.x * H;
  float ss = 0;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) {
    float v = row[j];
    if (y) row[j] = v = v + __half2float(y[blockIdx.x * H + j]);
    if (h16) h16[blockIdx.x * H + j] = __float2half(v);
    ss += v * v;
  }
  if (!out) return;
  const float inv = rsqrtf(block_sum(ss) / float(H) + eps);
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) out[blockIdx.x * H + j] = __float2half(row[j] * inv * w[j]);
}

__global__ void swiglu_kernel(const __half* gu, int64_t rows, int64_t I, __half* out) {
  NIBBLE_FLAT_LOOP(i, rows * I) {
    const int64_t r = i / I, j = i % I;
    const float a = __half2float(gu[r * 2 * I + j]), b = __half2float(gu[r * 2 * I + I + j]);
    out[i] = __float2half(a / (1.0f + expf(-a)) * b);
  }
}

__global__ void add_bias_kernel(__half* y, const __half* b, int64_t rows, int64_t N) {
  NIBBLE_FLAT_LOOP(i, rows * N) y[i] = __float2half(__half2float(y[i]) + __half2float(b[i % N]));
}

// One block of kRowThreads per row: the norm and the E dot products are block reductions, the
// softmax and top-k (E is 8 for Mixtral) thread 0's.
__global__ void __launch_bounds__(kRowThreads) moe_route_kernel(const float* h, int64_t H, const float* norm,
                                                                 float eps, const float* router, int E, int k,
                                                                 float* weights) {
  __shared__ float p[kMaxExperts];
  const float* x = h + blockIdx.x * H;
  float ss = 0;
  for (int64_t j = threadIdx.x; j < H; j += kRowThreads) ss += x[j] * x[j];
  const float inv = 1.0f / sqrtf(block_sum(ss) / float(H) + eps);
  for (int e = 0; e < E; ++e) {
    float dot = 0;
    for (int64_t j = threadIdx.x; j < H; j += kRowThreads) dot += router[e * H + j] * (norm[j] * (x[j] * inv));
    dot = block_sum(dot);
    if (threadIdx.x == 0) p[e] = dot;
  }
  if (threadIdx.x != 0) return;
  float* w = weights + blockIdx.x * E;
  float mx = p[0];
  for (int e = 1; e < E; ++e) mx = fmaxf(mx, p[e]);
  float sum = 0;
  for (int e = 0; e < E; ++e) sum += (p[e] = expf(p[e] - mx));
  for (int e = 0; e < E; ++e) p[e] /= sum;
  // Expert e is kept when fewer than k experts rank above it (higher probability, or equal and lower index).
  uint64_t keep = 0;
  float kept = 0;
  for (int e = 0; e < E; ++e) {
    int above = 0;
    for (int f = 0; f < E; ++f) above += p[f] > p[e] || (p[f] == p[e] && f < e);
    if (above < k) {
      keep |= uint64_t(1) << e;
      kept += p[e];
    }
  }
  for (int e = 0; e < E; ++e) w[e] = keep >> e & 1 ? p[e] / kept : 0.0f;
}

__global__ void add_expert_output_kernel(float* h, const __half* y, const float* weights, int E, int e,
                                         int64_t rows, int64_t H) {
  NIBBLE_FLAT_LOOP(i, rows * H) h[i] += weights[(i / H) * E + e] * __half2float(y[i]);
}

// One warp per vector.
template <int E>
__global__ void hadamard_heads_kernel(__half* x, int64_t vectors) {
  const int64_t v = blockIdx.x * int64_t(kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (v >= vectors) return;
  __half* p = x + v * 32 * E;
  float r[E];
#pragma unroll
  for (int e = 0; e < E; ++e) r[e] = __half2float(p[lane + 32 * e]);
  hadamard_strided(r, lane);
#pragma unroll
  for (int e = 0; e < E; ++e) p[lane + 32 * e] = __float2half(r[e]);
}

__global__ void gather_rows_kernel(const __half* x, const int32_t* idx, int64_t n, int64_t H, __half* out) {
  NIBBLE_FLAT_LOOP(i, n * H) out[i] = x[int64_t(idx[i / H]) * H + i % H];
}

__global__ void argmax_kernel(const float* logits, int64_t V, int32_t* ids, int32_t* nonfinite) {
  __shared__ float best_v[kRowThreads / 32];
  __shared__ int32_t best_i[kRowThreads / 32];
  const float* row = logits + blockIdx.x * V;
  float bv = -INFINITY;
  int32_t bi = INT32_MAX;
  bool bad = false;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) {
    const float v = row[j];
    bad |= !isfinite(v);
    if (ranks_before(v, int32_t(j), bv, bi)) bv = v, bi = int32_t(j);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *nonfinite = 1;
  warp_best(bv, bi);
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = bv, best_i[threadIdx.x / 32] = bi;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kRowThreads / 32; ++w)
    if (ranks_before(best_v[w], best_i[w], bv, bi)) bv = best_v[w], bi = best_i[w];
  ids[blockIdx.x] = bi == INT32_MAX ? 0 : bi;  // an all-NaN row (flagged above) still names a token
}

}  // namespace

void embed_rows(const int32_t* tokens, int64_t n, const __half* table, int64_t first, int64_t table_rows, int64_t H,
                float* h, cudaStream_t stream) {
  if (n == 0) return;
  embed_kernel<<<flat_blocks(n * H), kThreads, 0, stream>>>(tokens, n, table, first, table_rows, H, h);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void rank_columns(const float* parts, int64_t rows, int64_t width, int64_t cols, float* out,
                  cudaStream_t stream) {
  if (rows * cols == 0) return;
  rank_columns_kernel<<<flat_blocks(rows * cols), kThreads, 0, stream>>>(parts, rows, width, cols, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void rank_columns(const __half* parts, int64_t rows, int64_t width, int64_t cols, __half* out,
                  cudaStream_t stream) {
  if (rows * cols == 0) return;
  rank_columns_kernel<<<flat_blocks(rows * cols), kThreads, 0, stream>>>(parts, rows, width, cols, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void residual_rmsnorm(float* h, const __half* y, int64_t rows, int64_t H, const float* w, float eps, __half* out,
                      __half* h16, cudaStream_t stream) {
  if (rows == 0) return;
  residual_rmsnorm_kernel<<<unsigned(rows), kRowThreads, 0, stream>>>(h, y, H, w, eps, out, h16);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void swiglu(const __half* gu, int64_t rows, int64_t I, __half* out, cudaStream_t stream) {
  if (rows == 0) return;
  swiglu_kernel<<<flat_blocks(rows * I), kThreads, 0, stream>>>(gu, rows, I, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void moe_route(const float* h, int64_t rows, int64_t H, const float* norm, float eps, const float* router, int E,
               int k, float* weights, cudaStream_t stream) {
  if (rows == 0) return;
  moe_route_kernel<<<unsigned(rows), kRowThreads, 0, stream>>>(h, H, norm, eps, router, E, k, weights);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void add_expert_output(float* h, const __half* y, const float* weights, int E, int e, int64_t rows, int64_t H,
                       cudaStream_t stream) {
  if (rows == 0) return;
  add_expert_output_kernel<<<flat_blocks(rows * H), kThreads, 0, stream>>>(h, y, weights, E, e, rows, H);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void add_bias(__half* y, const __half* b, int64_t rows, int64_t N, cudaStream_t stream) {
  if (rows == 0) return;
  add_bias_kernel<<<flat_blocks(rows * N), kThreads, 0, stream>>>(y, b, rows, N);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void hadamard_heads(__half* x, int64_t vectors, int D, cudaStream_t stream) {
  require(D == 64 || D == 128, "hadamard_heads", "vectors of {} values (64 or 128 expected)", D);
  if (vectors == 0) return;
  const unsigned blocks = unsigned((vectors + kThreads / 32 - 1) / (kThreads / 32));
  if (D == 128) hadamard_heads_kernel<4><<<blocks, kThreads, 0, stream>>>(x, vectors);
  else hadamard_heads_kernel<2><<<blocks, kThreads, 0, stream>>>(x, vectors);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void gather_rows(const __half* x, const int32_t* idx, int64_t n, int64_t H, __half* out, cudaStream_t stream) {
  if (n == 0) return;
  gather_rows_kernel<<<flat_blocks(n * H), kThreads, 0, stream>>>(x, idx, n, H, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void argmax_rows(const float* logits, int64_t rows, int64_t V, int32_t* ids, int32_t* nonfinite,
                 cudaStream_t stream) {
  if (rows == 0) return;
  argmax_kernel<<<unsigned(rows), kRowThreads, 0, stream>>>(logits, V, ids, nonfinite);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda
