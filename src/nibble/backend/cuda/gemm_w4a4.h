// Atom's mixed-precision W4A4 GEMM on Hopper's INT8 tensor cores:
//   Y[M, N] (fp16 or bf16) = X[M, K] · W[N, K]ᵀ
// X and W in the GPU layout of atom_layout.h (same K, same keeper). The 4-bit codes stay 4-bit in
// memory and are widened to INT8 in registers; each K slab (an INT4 group of 128, or half a keeper
// group) is accumulated in int32 on the tensor cores and folded into an fp32 accumulator with
// scale_x[m, g] · scale_w[n, g] (multiplied in fp32), the DeepGEMM way. Kernels:
//   stream (M <= 16, W <= 16 MB): a GEMV: W streamed once through per-warp register rings, whole W
//                     tiles per block, split-K over a cluster only for small N, sums finished on chip.
//   decode (M <= 64): W streamed once through registers (`mma.sync`), split-K over the SMs, the
//                     partial sums reduced in-kernel by the last block of each column range.
//   wgmma  (M > 64):  128×128 block tiles on `wgmma.m64n128k32.s8` (sm_90a), W as the register A
//                     operand, X unpacked to INT8 in shared memory as B, fold overlapped with the MMA,
//                     split-K over a cluster where the tiles do not fill the SMs; warp-specialised: a
//                     producer warpgroup (cp.async loads, X unpack) and two consumer warpgroups
//                     (wgmma + fold) synchronised through mbarriers only.
//   wgmma lockstep:   v6, the same tiles and results bit for bit with all 8 warps doing every phase
//                     between block barriers: slower everywhere, kept as the bit-identity oracle of the
//                     tests (GemmPath::WgmmaLockstep).
// All deterministic (fixed summation orders).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "nibble/backend/cuda/atom_layout.h"

namespace nibble::cuda {

enum class OutType { F16, BF16 };

// Which kernel runs: Auto picks by M; tests and benches force the others.
enum class GemmPath { Auto, Stream, Decode, Wgmma, WgmmaLockstep };
inline constexpr int64_t kStreamMaxM = 16;
inline constexpr int64_t kStreamMaxWeightBytes = int64_t(16) << 20;  // Auto takes the stream kernel up to here

// Bytes of scratch gemm_w4a4 needs for these shapes (split-K partial sums + counters). The
// workspace must be zero-filled once when allocated; the kernels leave it zeroed again.
size_t gemm_w4a4_workspace_bytes(int64_t M, int64_t N, int K, int keeper);

// Throws nibble::Error on mismatched shapes, a too-small workspace or a forced path that cannot
// take M (Stream: M <= 16, Decode: M <= 64). Asynchronous on `stream`.
void gemm_w4a4(const AtomOperand& x, const AtomOperand& w, void* y, OutType out, void* workspace,
               size_t workspace_bytes, cudaStream_t stream, GemmPath path = GemmPath::Auto);

// ---- v9 experiment (issue 17; bench and tests only, not in Auto) ----------------------------------
// Does taking the X unpack out of the wgmma kernel free its producer? X pre-widened to what the
// consumers read: per 128-token tile and slab one contiguous block of kXInt8BlockBytes, the slab's
// INT8 codes (16 * code for INT4 slabs, as the kernels widen them) in the canonical K-major wgmma B
// layout (byte (token n, channel k of the slab) at (k / 16) * 2048 + (n / 8) * 128 + (n % 8) * 16 +
// k % 16; keeper slabs fill k < 64, the rest zero), then the 128 tokens' scales in fp32. Blocks
// ordered [token tile][slab]; tokens >= M hold code 0 and scale 0. In production norm_quantize would
// write this layout directly.
inline constexpr int kXInt8BlockBytes = 128 * 128 + 128 * 4;
struct AtomXInt8 {
  const uint8_t* blocks = nullptr;  // x_int8_b_layout_bytes(shape)
  AtomShape shape;                  // of the X it was made from
};
size_t x_int8_b_layout_bytes(const AtomShape& x);
// X (GPU layout) -> the pre-widened blocks at `out`. Asynchronous on `stream`.
void x_to_int8_b_layout(const AtomOperand& x, uint8_t* out, cudaStream_t stream);
// Y = X·Wᵀ on the warp-specialised wgmma kernel whose producer copies X's blocks (one bulk copy a
// slab) instead of unpacking them: the same bits as GemmPath::Wgmma. Any M >= 1, no workspace.
void gemm_w4a4_x_int8(const AtomXInt8& x, const AtomOperand& w, void* y, OutType out, cudaStream_t stream);

}  // namespace nibble::cuda
