// The argmax reduction the greedy pick and the device sampler share.
#pragma once

#include <cstdint>

#include "nibble/backend/sampling.h"

namespace nibble::cuda {

// Leaves on every lane the best (value, id) of the warp's lanes, best by ranks_before.
__device__ inline void warp_best(float& v, int32_t& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ranks_before(ov, oi, v, i)) v = ov, i = oi;
  }
}

}  // namespace nibble::cuda
