#include "nibble/backend/cuda/linear_fp16.h"

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {

namespace {

// Column-major view: Yᵀ [N, M] = W [N, K] (stored as K x N col-major, transposed) · Xᵀ [K, M].
void gemm(cublasHandle_t h, const __half* x, const __half* w, void* y, cudaDataType_t y_type, int64_t M, int64_t N,
          int64_t K, cudaStream_t stream) {
  NIBBLE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const float alpha = 1.0f, beta = 0.0f;
  NIBBLE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &alpha, w, CUDA_R_16F, int(K),
                                   x, CUDA_R_16F, int(K), &beta, y, y_type, int(N), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}

// The few-token product (decode at small batch) reads every weight once and does M multiply-adds
// per weight: it is bound by memory, which a GEMM's tiles do not reach at one token. Each warp
// streams kRowsPerWarp weight rows in 16-byte loads, kUnroll chunks ahead per row so that enough
// bytes are in flight; x's M rows (a few KB) come through L1. fp32 accumulation.
constexpr int kWarps = 8, kRowsPerWarp = 2, kUnroll = 4;

__device__ __forceinline__ void dot8(const uint4& w, const uint4& x, float& acc) {
  const __half2* wh = reinterpret_cast<const __half2*>(&w);
  const __half2* xh = reinterpret_cast<const __half2*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __half22float2(wh[i]), b = __half22float2(xh[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

__device__ __forceinline__ void store(__half* y, float v) { *y = __float2half(v); }
__device__ __forceinline__ void store(float* y, float v) { *y = v; }

template <int M, typename Out>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const __half* __restrict__ x, const __half* __restrict__ w,
                                                           Out* __restrict__ y, int64_t N, int64_t K) {
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarps + threadIdx.x / 32) * kRowsPerWarp;
  if (n0 >= N) return;
  const int64_t chunks = K / 8;
  const uint4* wrow[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)  // a row past N re-reads the last one; its result is dropped
    wrow[r] = reinterpret_cast<const uint4*>(w + std::min(n0 + r, N - 1) * K);
  float acc[kRowsPerWarp][M] = {};
  for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    uint4 wv[kUnroll][kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        wv[u][r] = c0 + 32 * u < chunks ? __ldcs(wrow[r] + c0 + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + 32 * u;
      if (c >= chunks) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * K) + c);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) dot8(wv[u][r], xv, acc[r][m]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && n0 + r < N) store(y + m * N + n0 + r, v);
    }
}

template <typename Out>
void gemv(const __half* x, const __half* w, Out* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  const unsigned blocks = unsigned((N + kWarps * kRowsPerWarp - 1) / (kWarps * kRowsPerWarp));
  static_assert(LinearFp16::kGemvMaxRows == 4, "one case per row count");
  switch (M) {
#define NIBBLE_GEMV_CASE(m) \
  case m: gemv_kernel<m, Out><<<blocks, kWarps * 32, 0, stream>>>(x, w, y, N, K); break;
    NIBBLE_GEMV_CASE(1)
    NIBBLE_GEMV_CASE(2)
    NIBBLE_GEMV_CASE(3)
    NIBBLE_GEMV_CASE(4)
#undef NIBBLE_GEMV_CASE
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

// The streaming path takes rows of whole 16-byte chunks on 16-byte aligned buffers.
bool gemv_fits(const void* x, const void* w, int64_t M, int64_t K) {
  return M >= 1 && M <= LinearFp16::kGemvMaxRows && K % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

}  // namespace

LinearFp16::LinearFp16() {
  // Split-K partial sums stay in fp32: by default cuBLAS may round them to the fp16 output type,
  // which measured 1.6e-5 of the products' magnitude on the H200 (K 4096), past one output rounding.
  NIBBLE_CUBLAS_CHECK(cublasSetMathMode(handle_.h, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
}

void LinearFp16::run(const __half* x, const __half* w, __half* y, int64_t M, int64_t N, int64_t K,
                     cudaStream_t stream) {
  if (gemv_fits(x, w, M, K)) return gemv(x, w, y, M, N, K, stream);
  gemm(handle_.h, x, w, y, CUDA_R_16F, M, N, K, stream);
}

void LinearFp16::run(const __half* x, const __half* w, float* y, int64_t M, int64_t N, int64_t K,
                     cudaStream_t stream) {
  if (gemv_fits(x, w, M, K)) return gemv(x, w, y, M, N, K, stream);
  gemm(handle_.h, x, w, y, CUDA_R_32F, M, N, K, stream);
}

}  // namespace nibble::cuda
