// IEEE fp16 and bfloat16 <-> fp32, round-to-nearest-even, bit-exact with hardware conversions.
#pragma once

#include <bit>
#include <cstdint>

namespace nibble {

inline float bf16_to_float(uint16_t h) { return std::bit_cast<float>(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

constexpr float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24
    float v = float(mant) * 0x1p-24f;
    return std::bit_cast<float>(std::bit_cast<uint32_t>(v) | sign);
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

constexpr uint16_t float_to_fp16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal or zero: round a * 2^24 to an integer, ties to even
    const float v = std::bit_cast<float>(a) * 0x1p24f;
    const float r = v + 0x1p23f - 0x1p23f;  // exact RNE for v < 2^23
    return sign | uint16_t(r);
  }
  uint32_t m = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  return sign | uint16_t((m - (112u << 23)) >> 13);
}

// Rounds through fp16 and back: what storing a value as fp16 does to it. constexpr: CUDA code
// (--expt-relaxed-constexpr) calls these as they are.
constexpr float round_fp16(float f) { return fp16_to_float(float_to_fp16(f)); }
inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }
inline void round_fp16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_fp16(x[i]);
}

}  // namespace nibble
