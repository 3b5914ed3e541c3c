// The orthonormal Walsh-Hadamard transform (quant/hadamard.h) on values spread over a warp, for
// the two layouts the kernels hold a vector in. Butterflies across lanes go through shuffles; the
// result equals hadamard_transform up to fp32 rounding (the stages run in another order).
#pragma once

#include <cuda_runtime.h>

namespace nibble::cuda {

// One butterfly stage between this lane and lane ^ mask: the lower lane keeps a + b, the upper a - b.
// `members`: the lanes taking part (all of them call it).
__device__ __forceinline__ float butterfly_across(float x, int lane, int mask, unsigned members = 0xffffffffu) {
  const float other = __shfl_xor_sync(members, x, mask);
  return (lane & mask) ? other - x : x + other;
}

// A vector of 32·E values, value e of lane l being element l + 32e (the attention kernels' head
// layout).
template <int E>
__device__ __forceinline__ void hadamard_strided(float (&x)[E], int lane) {
#pragma unroll
  for (int mask = 1; mask < 32; mask *= 2)
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = butterfly_across(x[e], lane, mask);
#pragma unroll
  for (int h = 1; h < E; h *= 2)
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (!(e & h)) {
        const float a = x[e], b = x[e + h];
        x[e] = a + b;
        x[e + h] = a - b;
      }
  const float norm = rsqrtf(float(32 * E));
#pragma unroll
  for (int e = 0; e < E; ++e) x[e] *= norm;
}

// A group of 128 values held by 128 / E consecutive lanes (`members`), value i of lane l being
// element E·(l % (128 / E)) + i (the quantize kernels' layout).
template <int E>
__device__ __forceinline__ void hadamard_blocked(float (&x)[E], int lane, unsigned members) {
#pragma unroll
  for (int h = 1; h < E; h *= 2)
#pragma unroll
    for (int i = 0; i < E; ++i)
      if (!(i & h)) {
        const float a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
#pragma unroll
  for (int mask = 1; mask < 128 / E; mask *= 2)
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = butterfly_across(x[i], lane, mask, members);
  const float norm = rsqrtf(128.0f);
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] *= norm;
}

}  // namespace nibble::cuda
