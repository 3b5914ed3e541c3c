// The W8A8 kernels: the per-token INT8 quantizer and the epilogue after cuBLASLt's INT8 GEMM. The
// host side is linear_w8a8.cpp (g++): nvcc 13's front end crashes on its std::map of
// cublasLtMatmulAlgo_t vectors ("internal error ... find_allocated_name_reference").
#include "nibble/backend/cuda/linear_w8a8.h"

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/format_device.cuh"

namespace nibble::cuda {

namespace {

constexpr int kThreads = 256;

// Four fp16 values at p (8-byte aligned) as floats.
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const __half2 a = *reinterpret_cast<const __half2*>(&u.x), b = *reinterpret_cast<const __half2*>(&u.y);
  return make_float4(__low2float(a), __high2float(a), __low2float(b), __high2float(b));
}

// One block per row: the row's absmax (permutation-invariant, so read in place), its scale, then
// the codes in permuted order, four channels per thread and step.
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const __half* x, int64_t K, const int32_t* perm, float clip, int8_t* codes, float* scales) {
  __shared__ float warp_absmax[kThreads / 32];
  __shared__ float row_scale;
  const __half* xr = x + blockIdx.x * K;
  float m = 0;
  for (int64_t c = 4 * threadIdx.x; c < K; c += 4 * kThreads) {
    const float4 v = load4(xr + c);
    m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) warp_absmax[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float absmax = 0;
    for (float w : warp_absmax) absmax = fmaxf(absmax, w);
    row_scale = int_sym_scale_device(clip, absmax, 127);
    scales[blockIdx.x] = row_scale;
  }
  __syncthreads();
  const float s = row_scale;
  int8_t* out = codes + blockIdx.x * K;
  for (int64_t c = 4 * threadIdx.x; c < K; c += 4 * kThreads) {
    const float4 v = perm ? make_float4(__half2float(xr[perm[c]]), __half2float(xr[perm[c + 1]]),
                                        __half2float(xr[perm[c + 2]]), __half2float(xr[perm[c + 3]]))
                          : load4(xr + c);
    *reinterpret_cast<char4*>(out + c) = make_char4(int_sym_code_device(v.x, s, 8), int_sym_code_device(v.y, s, 8),
                                                    int_sym_code_device(v.z, s, 8), int_sym_code_device(v.w, s, 8));
  }
}

// y[r, n] = fp16(acc[r, n] · row_scales[r] · col_scales[n] (+ bias[n])), four outputs per thread.
__global__ void rescale_kernel(const int32_t* acc, const float* row_scales, const float* col_scales,
                               const __half* bias, int64_t rows, int64_t N, __half* y) {
  const int64_t i = 4 * (blockIdx.x * int64_t(blockDim.x) + threadIdx.x);
  if (i >= rows * N) return;
  const int64_t n = i % N;
  const int4 a = *reinterpret_cast<const int4*>(acc + i);
  const float4 s = *reinterpret_cast<const float4*>(col_scales + n);
  const float r = row_scales[i / N];
  float v[4] = {float(a.x) * r * s.x, float(a.y) * r * s.y, float(a.z) * r * s.z, float(a.w) * r * s.w};
  if (bias)
    for (int k = 0; k < 4; ++k) v[k] += __half2float(bias[n + k]);
  const __half2 lo = __floats2half2_rn(v[0], v[1]), hi = __floats2half2_rn(v[2], v[3]);
  uint2 out;
  out.x = *reinterpret_cast<const uint32_t*>(&lo);
  out.y = *reinterpret_cast<const uint32_t*>(&hi);
  *reinterpret_cast<uint2*>(y + i) = out;
}

}  // namespace

void quantize_rows_int8(const __half* x, int64_t rows, int64_t K, const int32_t* perm, float clip, int8_t* codes,
                        float* scales, cudaStream_t stream) {
  require(K % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 8 == 0, "quantize_rows_int8",
          "rows of {} fp16 values at {} are not 8-byte aligned", K, static_cast<const void*>(x));
  if (rows == 0) return;
  quantize_rows_kernel<<<unsigned(rows), kThreads, 0, stream>>>(x, K, perm, clip, codes, scales);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void w8a8_rescale(const int32_t* acc, const float* row_scales, const float* col_scales, const __half* bias,
                  int64_t rows, int64_t N, __half* y, cudaStream_t stream) {
  const int64_t quads = rows * N / 4;
  if (quads == 0) return;
  rescale_kernel<<<unsigned((quads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(acc, row_scales, col_scales,
                                                                                       bias, rows, N, y);
  NIBBLE_CUDA_CHECK_LAUNCH();
}
}  // namespace nibble::cuda
