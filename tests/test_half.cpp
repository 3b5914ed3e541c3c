// fp16/bf16 conversions against float64 reference rounding over every 16-bit pattern.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "nibble/core/dtype.h"
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

// Checkpoint-sized conversions run on several threads: every value equals its float64 decoding
// (all 65536 fp16 patterns, repeated past the parallel threshold), and the first non-finite value
// is found however the blocks are shared out.
TEST(Half, LargeConversionsAndTheFirstNonFiniteValue) {
  const size_t n = size_t(3) << 20;
  std::vector<uint16_t> bits(n);
  for (size_t i = 0; i < n; ++i) bits[i] = uint16_t(i * 40503u);  // odd: each pattern 48 times
  std::vector<float> out(n);
  convert_to_f32(bits.data(), DType::F16, n, out.data());
  for (size_t i = 0; i < n; ++i) {
    const double want = fp16_value(bits[i]);
    if (std::isnan(want)) ASSERT_TRUE(std::isnan(out[i])) << i;
    else ASSERT_EQ(double(out[i]), want) << i;
  }
  std::vector<float> x(n, 1.0f);
  EXPECT_EQ(find_non_finite(x.data(), int64_t(n)), -1);
  std::mt19937 rng(20261203);
  for (int trial = 0; trial < 4; ++trial) {
    std::fill(x.begin(), x.end(), 1.0f);
    const int64_t a = int64_t(rng() % n), b = int64_t(rng() % n);
    x[size_t(a)] = INFINITY;
    x[size_t(b)] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_EQ(find_non_finite(x.data(), int64_t(n)), std::min(a, b)) << "seed 20261203 trial " << trial;
  }
}

}  // namespace
}  // namespace nibble
