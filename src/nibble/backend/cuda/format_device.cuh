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

// quant::int_sym_encode, as an int, with round_half_even done by adding and subtracting 1.5 * 2^23
// (two full-rate fp32 adds; round_half_even's float<->int conversions run at a quarter of the rate
// and bounded norm_quantize v1). Same result for every input:
//   |y| < 2^22: y + 1.5*2^23 lies in [2^23, 2^24), where the spacing is 1, so the add rounds y to
//               the nearest integer, ties to even, and the subtraction is exact;
//   |y| >= 2^22 and ±inf: the result is still beyond ±qmax and clamps like format.h's;
//   NaN: both clamps compare false, so it lands on -qmax - 1 as in format.h.
// The int comes out of the mantissa of q + 1.5*2^23 (q is an integer in [-128, 127]).
__device__ __forceinline__ int int_sym_code_fast(float x, float scale, int bits) {
  if (scale == 0) return 0;
  const float qmax = float((1 << (bits - 1)) - 1);
  float q = __fsub_rn(__fadd_rn(x / scale, 12582912.0f), 12582912.0f);
  q = q > qmax ? qmax : q;
  q = q >= -qmax - 1 ? q : -qmax - 1;
  return __float_as_int(__fadd_rn(q, 12582912.0f)) - 0x4B400000;
}

// int_sym_code_fast with x / scale computed from a per-group reciprocal rcp = 1 / scale (IEEE,
// once per group) and one Newton step on the exact FMA residual (Markstein): q0 = x·rcp,
// e = x - q0·scale (exact), y = q0 + e·rcp is the correctly rounded x / scale barring over- and
// underflow, where the clamps and the zero code make the results agree anyway. Three instructions
// instead of the IEEE division's ~10 (norm_quantize v4 issued at 80% of peak, instruction-bound).
__device__ __forceinline__ int int_sym_code_rcp(float x, float scale, float rcp, int bits) {
  if (scale == 0) return 0;
  const float qmax = float((1 << (bits - 1)) - 1);
  const float q0 = __fmul_rn(x, rcp);
  const float y = __fmaf_rn(__fmaf_rn(-q0, scale, x), rcp, q0);
  float q = __fsub_rn(__fadd_rn(y, 12582912.0f), 12582912.0f);
  q = q > qmax ? qmax : q;
  q = q >= -qmax - 1 ? q : -qmax - 1;
  return __float_as_int(__fadd_rn(q, 12582912.0f)) - 0x4B400000;
}

}  // namespace nibble::cuda
