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

// The bias of int_sym_biased_rcp's results: code c is the float kIntSymBias + c.
inline constexpr float kIntSymBias = 12582912.0f;  // 1.5·2^23

// quant::int_sym_encode(x, scale, bits) for scale != 0 (a zero scale encodes everything as 0: the
// caller's branch, once per group) as the bits of the float 1.5·2^23 + code, whose low byte is the
// code in two's complement (its low nibble the INT4 one), so a kernel packs codes with byte
// permutes. qmax = 2^(bits-1) - 1; rcp = 1 / scale (IEEE, once per group).
//   Division: q0 = x·rcp, e = x - q0·scale (exact, FMA), y = q0 + e·rcp is the correctly rounded
//     x / scale barring over- and underflow (Markstein), where the clamps and the zero code make the
//     results agree anyway: three instructions instead of the IEEE division's ~10.
//   Rounding: |y| < 2^22: y + 1.5·2^23 lies in [2^23, 2^24), where the spacing is 1, so the add
//     rounds y to the nearest integer, ties to even, exactly (round_half_even's float<->int
//     conversions run at a quarter of the rate); |y| >= 2^22 and ±inf land beyond ±qmax and clamp
//     like format.h's.
//   Clamp: fmaxf first turns NaN into the low end, where format.h's comparisons put it.
__device__ __forceinline__ int int_sym_biased_rcp(float x, float scale, float rcp, int qmax) {
  const float q0 = __fmul_rn(x, rcp);
  const float y = __fmaf_rn(__fmaf_rn(-q0, scale, x), rcp, q0);
  const float b = fminf(fmaxf(__fadd_rn(y, kIntSymBias), kIntSymBias - float(qmax + 1)), kIntSymBias + float(qmax));
  return __float_as_int(b);
}

}  // namespace nibble::cuda
