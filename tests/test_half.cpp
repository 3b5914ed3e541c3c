// fp16/bf16 conversions against float64 reference rounding over every 16-bit pattern.
#include <cmath>
#include <cstdint>
#include <limits>

#include <gtest/gtest.h>

#include "nibble/core/half.h"

namespace nibble {
namespace {

// Decodes an fp16 bit pattern with float64 arithmetic (independent of fp16_to_float).
double fp16_value(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exp = (h >> 10) & 31, mant = h & 1023;
  if (exp == 0) return sign * std::ldexp(double(mant), -24);
  if (exp == 31) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(1.0 + mant / 1024.0, exp - 15);
}

TEST(Half, Fp16DecodeMatchesFloat64Definition) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double ref = fp16_value(uint16_t(h));
    const float got = fp16_to_float(uint16_t(h));
    if (std::isnan(ref)) EXPECT_TRUE(std::isnan(got)) << h;
    else EXPECT_EQ(double(got), ref) << h;
  }
}

TEST(Half, Fp16EncodeIsNearestEven) {
  // Every finite fp16 value and every midpoint between neighbours must round correctly.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double v = fp16_value(uint16_t(h));
    EXPECT_EQ(float_to_fp16(float(v)), h);
    EXPECT_EQ(float_to_fp16(float(-v)), h | 0x8000);
    if (h + 1 < 0x7c00) {
      const double mid = 0.5 * (v + fp16_value(uint16_t(h + 1)));
      const uint16_t even = (h & 1) ? uint16_t(h + 1) : uint16_t(h);
      EXPECT_EQ(float_to_fp16(float(mid)), even) << "midpoint above " << h;
    }
  }
  EXPECT_EQ(float_to_fp16(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_fp16(INFINITY), 0x7c00);
  EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(NAN))));
}

TEST(Half, Bf16RoundTripAndRounding) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(float_to_bf16(f), h);
  }
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even gives 1.
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 0x1p-8f)), 1.0f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f)), 1.0f + 0x1p-7f);
}

}  // namespace
}  // namespace nibble
