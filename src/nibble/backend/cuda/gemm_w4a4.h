// Atom's mixed-precision W4A4 GEMM on Hopper's INT8 tensor cores:
//   Y[M, N] (fp16 or bf16) = X[M, K] · W[N, K]ᵀ
// X and W in the GPU layout of atom_layout.h (same K, same keeper). The 4-bit codes stay 4-bit in
// memory and are widened to INT8 in registers; each K slab (an INT4 group of 128, or half a keeper
// group) is accumulated in int32 by `mma.sync.m16n8k32.s8` and folded into an fp32 accumulator
// with scale_x[m, g] · scale_w[n, g] (multiplied in fp32), the DeepGEMM way.
//   decode  (M <= 64): W streamed once through a per-warp cp.async ring, split-K over the SMs, the partial sums
//                      reduced in-kernel by the last block of each column range (deterministic).
//   prefill (M > 64):  128×128 block tiles, 4-stage cp.async pipeline, 16 warps of 32×32.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "nibble/backend/cuda/atom_layout.h"

namespace nibble::cuda {

enum class OutType { F16, BF16 };

// Bytes of scratch gemm_w4a4 needs for these shapes (split-K partial sums + counters). The
// workspace must be zero-filled once when allocated; the kernels leave it zeroed again.
size_t gemm_w4a4_workspace_bytes(int64_t M, int64_t N, int K, int keeper);

// Throws nibble::Error on mismatched shapes or a too-small workspace. Asynchronous on `stream`.
// `force_path`: 0 automatic, 1 decode kernel (needs M <= 64), 2 prefill kernel, 3 the 8-warp
// prefill kernel of v2 (tests, benches).
void gemm_w4a4(const AtomOperand& x, const AtomOperand& w, void* y, OutType out, void* workspace,
               size_t workspace_bytes, cudaStream_t stream, int force_path = 0);

}  // namespace nibble::cuda
