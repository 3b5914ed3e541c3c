// Device-callable pieces of quant/format.h. The element functions there are constexpr and are
// called as they are (nvcc --expt-relaxed-constexpr); this header only mirrors the two helpers
// format.h defines as plain `inline` host functions, rule for rule, with CUDA's fp16 conversion
// (__float2half_rn: round to nearest even, like nibble::round_fp16).
#pragma once

#include <cuda_fp16.h>

#include "nibble/quant/format.h"

namespace nibble::cuda {

// quant::fp16_scale: 0 stays 0, a nonzero value never becomes 0 (2^-24) nor inf (65504).
__device__ __forceinline__ float fp16_scale_device(float raw) {
  if (raw == 0) return 0;
  const float s = __half2float(__float2half_rn(raw));
  if (s == 0) return 0x1p-24f;
  return s > 65504.0f ? 65504.0f : s;
}

// quant::choose_scale for the symmetric INT grids (Int4Sym: qmax 7, Int8Sym: qmax 127), from the
// group's absmax (GroupStats::absmax: both ends start at 0, so it is max |x|).
__device__ __forceinline__ float int_sym_scale_device(float clip, float absmax, int qmax) {
  return fp16_scale_device(clip * absmax / float(qmax));
}

// quant::int_sym_encode, the constexpr definition itself.
__device__ __forceinline__ int8_t int_sym_code_device(float x, float scale, int bits) {
  return int8_t(quant::int_sym_encode(x, scale, bits));
}

}  // namespace nibble::cuda
