// The orthonormal Walsh-Hadamard transform: an exact rotation that spreads outliers evenly over
// a block of channels before quantization (its own inverse, n a power of two).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace nibble::quant {

// Entry (i, j) of the unnormalized Walsh-Hadamard matrix in hadamard_transform's (Sylvester) order.
inline int walsh_sign(int64_t i, int64_t j) { return std::popcount(uint64_t(i & j)) % 2 ? -1 : 1; }

inline void hadamard_transform(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float norm = 1.0f / std::sqrt(float(n));
  for (int64_t i = 0; i < n; ++i) x[i] *= norm;
}

}  // namespace nibble::quant
