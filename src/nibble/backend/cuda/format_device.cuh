// Device-callable pieces of quant/format.h. The element functions there are constexpr and are
// called as they are (nvcc --expt-relaxed-constexpr); this header only mirrors the two helpers
// format.h defines as plain `inline` host functions, rule for rule, with CUDA's fp16 conversion
// (__float2half_rn: round to nearest even, like nibble::round_fp16).
#pragma once

#include <cuda_fp16.h>

#include <cfloat>

#include "nibble/quant/format.h"

namespace nibble::cuda {

// quant::fp16_scale: 0 stays 0, a nonzero value never becomes 0 (2^-24) nor inf (65504). Written
// as selects (same results, NaN and -inf included) so that a kernel computing it per group and
// lane does not branch.
__device__ __forceinline__ float fp16_scale_device(float raw) {
  const float s = __half2float(__float2half_rn(raw));
  const float nonzero = s == 0 ? 0x1p-24f : (s > 65504.0f ? 65504.0f : s);
  return raw == 0 ? 0.0f : nonzero;
}

// x / qmax rounded to nearest, the float `x / float(qmax)` gives, for the INT grids' qmax 7 and 127
// (rcp = 1 / qmax rounded to nearest): Markstein's correction q0 = x·rcp, y = q0 + (x - q0·qmax)·rcp
// (the remainder exact by FMA) equals the IEEE quotient for every finite float x, subnormals
// included, but -0 (gives +0; fp16_scale_device makes both 0): all 2^32 inputs checked for both
// qmax, on the CPU and by test_norm_quantize's ScaleMathEqualsIeee on the device. ±inf and NaN, where
// the remainder is NaN, return x, which is x / qmax there. 4 instructions instead of the division's
// ~13 (it runs once per group and lane).
__device__ __forceinline__ float div_by_qmax(float x, float qmax, float rcp) {
  const float q0 = __fmul_rn(x, rcp);
  const float y = __fmaf_rn(__fmaf_rn(-q0, qmax, x), rcp, q0);
  return isnan(y) ? x : y;
}

// quant::choose_scale for the symmetric INT grids (Int4Sym: qmax 7, Int8Sym: qmax 127), from the
// group's absmax (GroupStats::absmax: both ends start at 0, so it is max |x|); rcp_qmax = 1 / qmax.
__device__ __forceinline__ float int_sym_scale_device(float clip, float absmax, float qmax, float rcp_qmax) {
  return fp16_scale_device(div_by_qmax(__fmul_rn(clip, absmax), qmax, rcp_qmax));
}
__device__ __forceinline__ float int_sym_scale_device(float clip, float absmax, int qmax) {
  return int_sym_scale_device(clip, absmax, float(qmax), 1.0f / float(qmax));
}

// 1 / s rounded to nearest (IEEE, what __frcp_rn gives) for s a nonzero finite fp16 value (a scale
// from fp16_scale_device): the fast path of ptxas's rcp.rn expansion (MUFU.RCP, then one Newton
// step by FMA) without its range check and slow-path branch, which such s (|s| in [2^-24, 65504])
// never take. 3 instructions instead of ~11. Equality with __frcp_rn on every nonzero finite fp16
// value: test_norm_quantize's ScaleMathEqualsIeee. s = 0 or ±inf give NaN (__frcp_rn: ±inf, ∓0).
__device__ __forceinline__ float rcp_fp16_scale(float s) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return __fmaf_rn(r, __fmaf_rn(-s, r, 1.0f), r);
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
//     conversions run at a quarter of the rate); |y| >= 2^22 lands beyond ±qmax and clamps
//     like format.h's (±inf does not: clamp_infinite_values).
//   Clamp: fmaxf first turns NaN into the low end, where format.h's comparisons put it.
// lo, hi: the clamp's ends as biased floats, kIntSymBias - (qmax + 1) and kIntSymBias + qmax (both
// kIntSymBias makes every code 0 whatever x and rcp are, NaN included: the zero scale's codes).
__device__ __forceinline__ int int_sym_biased_rcp(float x, float scale, float rcp, float lo, float hi) {
  const float q0 = __fmul_rn(x, rcp);
  const float y = __fmaf_rn(__fmaf_rn(-q0, scale, x), rcp, q0);
  return __float_as_int(fminf(fmaxf(__fadd_rn(y, kIntSymBias), lo), hi));
}
__device__ __forceinline__ int int_sym_biased_rcp(float x, float scale, float rcp, int qmax) {
  return int_sym_biased_rcp(x, scale, rcp, kIntSymBias - float(qmax + 1), kIntSymBias + float(qmax));
}

// int_sym_biased_rcp's remainder x - q0·scale is NaN for x = ±inf, so both would take NaN's code,
// the low end: right for -inf only. Only a group whose absmax is inf holds one, and its scale is then
// 65504 (fp16_scale's cap): such a group's values are clamped to ±FLT_MAX first, which encode as ±inf
// do (beyond ±qmax), NaN still to the low end. A branch per group, so other groups pay nothing.
template <int N>
__device__ __forceinline__ void clamp_infinite_values(float scale, float (&v)[N]) {
  if (scale != 65504.0f) return;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = fminf(fmaxf(v[i], -FLT_MAX), FLT_MAX);
}

}  // namespace nibble::cuda
