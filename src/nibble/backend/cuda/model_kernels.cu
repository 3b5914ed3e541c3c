#include "nibble/backend/cuda/model_kernels.h"

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/hadamard_device.cuh"

namespace nibble::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void embed_kernel(const int32_t* tokens, const __half* table, int64_t H, float* h) {
  const int64_t row = blockIdx.x;
  const __half* src = table + int64_t(tokens[row]) * H;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) h[row * H + j] = __half2float(src[j]);
}

__device__ float block_sum(float v) {
  __shared__ float partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];
  __syncthreads();  // partial is reused by the next call
  return total;
}

__global__ void residual_rmsnorm_kernel(float* h, const __half* y, int64_t H, const float* w, float eps,
                                        __half* out, __half* h16) {
  float* row = h + blockIdx.x * H;
  float ss = 0;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    float v = row[j];
    if (y) row[j] = v = v + __half2float(y[blockIdx.x * H + j]);
    if (h16) h16[blockIdx.x * H + j] = __float2half(v);
    ss += v * v;
  }
  if (!out) return;
  const float inv = rsqrtf(block_sum(ss) / float(H) + eps);
  for (int64_t j = threadIdx.x; j < H; j += kThreads) out[blockIdx.x * H + j] = __float2half(row[j] * inv * w[j]);
}

__global__ void swiglu_kernel(const __half* gu, int64_t I, __half* out) {
  const __half* g = gu + blockIdx.x * 2 * I;
  for (int64_t j = threadIdx.x; j < I; j += kThreads) {
    const float a = __half2float(g[j]), b = __half2float(g[I + j]);
    out[blockIdx.x * I + j] = __float2half(a / (1.0f + expf(-a)) * b);
  }
}

__global__ void add_bias_kernel(__half* y, const __half* b, int64_t N) {
  for (int64_t j = threadIdx.x; j < N; j += kThreads)
    y[blockIdx.x * N + j] = __float2half(__half2float(y[blockIdx.x * N + j]) + __half2float(b[j]));
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

__global__ void gather_rows_kernel(const __half* x, const int32_t* idx, int64_t H, __half* out) {
  const __half* src = x + int64_t(idx[blockIdx.x]) * H;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) out[blockIdx.x * H + j] = src[j];
}

// (value, index) pairs: the larger value wins, the lower index on a tie.
__device__ bool beats(float v, int32_t i, float bv, int32_t bi) { return v > bv || (v == bv && i < bi); }

__global__ void argmax_kernel(const float* logits, int64_t V, int32_t* ids, int32_t* nonfinite) {
  __shared__ float best_v[kThreads / 32];
  __shared__ int32_t best_i[kThreads / 32];
  const float* row = logits + blockIdx.x * V;
  float bv = -INFINITY;
  int32_t bi = INT32_MAX;
  bool bad = false;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = row[j];
    bad |= !isfinite(v);
    if (beats(v, int32_t(j), bv, bi)) bv = v, bi = int32_t(j);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *nonfinite = 1;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (beats(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  if (threadIdx.x % 32 == 0) best_v[threadIdx.x / 32] = bv, best_i[threadIdx.x / 32] = bi;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kThreads / 32; ++w)
    if (beats(best_v[w], best_i[w], bv, bi)) bv = best_v[w], bi = best_i[w];
  ids[blockIdx.x] = bi == INT32_MAX ? 0 : bi;  // an all-NaN row (flagged above) still names a token
}

}  // namespace

void embed_rows(const int32_t* tokens, int64_t n, const __half* table, int64_t H, float* h, cudaStream_t stream) {
  if (n == 0) return;
  embed_kernel<<<unsigned(n), kThreads, 0, stream>>>(tokens, table, H, h);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void residual_rmsnorm(float* h, const __half* y, int64_t rows, int64_t H, const float* w, float eps, __half* out,
                      __half* h16, cudaStream_t stream) {
  if (rows == 0) return;
  residual_rmsnorm_kernel<<<unsigned(rows), kThreads, 0, stream>>>(h, y, H, w, eps, out, h16);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void swiglu(const __half* gu, int64_t rows, int64_t I, __half* out, cudaStream_t stream) {
  if (rows == 0) return;
  swiglu_kernel<<<unsigned(rows), kThreads, 0, stream>>>(gu, I, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void add_bias(__half* y, const __half* b, int64_t rows, int64_t N, cudaStream_t stream) {
  if (rows == 0) return;
  add_bias_kernel<<<unsigned(rows), kThreads, 0, stream>>>(y, b, N);
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
  gather_rows_kernel<<<unsigned(n), kThreads, 0, stream>>>(x, idx, H, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void argmax_rows(const float* logits, int64_t rows, int64_t V, int32_t* ids, int32_t* nonfinite,
                 cudaStream_t stream) {
  if (rows == 0) return;
  argmax_kernel<<<unsigned(rows), kThreads, 0, stream>>>(logits, V, ids, nonfinite);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda
