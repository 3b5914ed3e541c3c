// Atom's mixed-precision W4A4 GEMM on Hopper's INT8 tensor cores:
//   Y[M, N] (fp16 or bf16) = X[M, K] · W[N, K]ᵀ
// X and W in the GPU layout of atom_layout.h (same K, same keeper). W's 4-bit codes stay 4-bit in
// memory and are widened to INT8 in registers (X's too, but on the wgmma path); each K slab (an INT4 group of 128, or half a keeper
// group) is accumulated in int32 on the tensor cores and folded into an fp32 accumulator with
// scale_x[m, g] · scale_w[n, g] (multiplied in fp32), the DeepGEMM way. Kernels:
//   stream (M <= 16, W <= 16 MB): a GEMV: W streamed once through per-warp register rings, whole W
//                     tiles per block, split-K over a cluster only for small N, sums finished on chip.
//   decode (M <= 64; Auto's below kWgmmaMinM): W streamed once through registers (`mma.sync`),
//                     split-K over the SMs, the partial sums reduced in-kernel by the last block of
//                     each column range.
//   wgmma  (any M; Auto's from kWgmmaMinM): X pre-widened to what the tensor cores read (INT8 codes
//                     in the wgmma B layout + fp32 scales per 128-token tile and slab), written so by norm_quantize or
//                     repacked by x_to_int8_b_layout into caller scratch; then 128×128 block tiles
//                     on `wgmma.m64n128k32.s8` (sm_90a), W as the register A operand, X's blocks
//                     copied as they are into shared memory as B,
//                     fold overlapped with the MMA, split-K over a cluster where the tiles do not fill
//                     the SMs; warp-specialised: a producer warpgroup that only copies (one bulk copy
//                     of X, cp.async of W a slab) and two consumer warpgroups (wgmma + fold),
//                     synchronised through mbarriers only.
//   wgmma stream-K:   the same producer, consumers and fold on a persistent grid (one block per SM)
//                     walking the flattened (tile, slab) space in equal contiguous shares; tiles cut
//                     between blocks are finished by the block holding their first slabs, which adds
//                     the others' fp32 partials (workspace, flags) in block order (GemmPath::WgmmaStreamK;
//                     plan and cost model: gemm_w4a4_plan.h). Auto takes it over wgmma where it measured
//                     faster (stream_k_measured_win: 16-32 tiles, and from 64 up where v9's last wave leaves
//                     SMs idle), if the scratch has a stream-K workspace.
//   wgmma lockstep:   v6, the same tiles and results bit for bit, X unpacked in the kernel, all 8
//                     warps doing every phase between block barriers: slower everywhere, kept as the
//                     bit-identity oracle of the tests (GemmPath::WgmmaLockstep).
// All deterministic (fixed summation orders).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "nibble/backend/cuda/atom_layout.h"
#include "nibble/backend/cuda/gemm_w4a4_plan.h"

namespace nibble::cuda {

enum class OutType { F16, BF16 };

// Which kernel runs: Auto picks by M; tests and benches force the others.
enum class GemmPath { Auto, Stream, Decode, Wgmma, WgmmaLockstep, WgmmaStreamK };
inline constexpr int64_t kStreamMaxM = 16;
// Auto at M <= 16: the stream kernel, but the decode kernel at M <= 8 on W above this, where it
// measured 2-6% faster (H100, session 19: 7B gate/up fused, 70B gate/up and down; the stream kernel
// won on every other layer, by 1-26% at M <= 8 and 10-44% at M = 16).
inline constexpr int64_t kStreamMaxWeightBytesToM8 = int64_t(40) << 20;
inline constexpr bool gemm_w4a4_auto_streams(int64_t M, int64_t w_packed_bytes) {
  return M <= kStreamMaxM && (M > 8 || w_packed_bytes <= kStreamMaxWeightBytesToM8);
}

// Scratch: three separate device buffers, which must not overlap (checked on every call). Callers
// that run several shapes on one scratch (the executor: every linear of a model) size each buffer by
// the maximum of its function over those shapes, separately: never one buffer for both.
//   split_k: the decode kernel's split-K partial sums and arrival counters (M <= 64). Zero-filled
//            once when allocated; the kernels leave it zeroed again, so nothing else may write it.
//   x_int8:  the wgmma path's X repacked (M >= kWgmmaMinM under Auto; any M when Wgmma is forced), overwritten
//            by every such call; 16-byte aligned. Bytes grow with M: size it for the largest M.
//   stream_k: the stream-K kernel's flags and fp32 partial tiles (GemmPath::WgmmaStreamK, any M), 16-byte
//            aligned. Zero-filled once when allocated; the kernel leaves its flags zero again, so
//            nothing else may write it, and no two calls sharing it may run at the same time.
struct GemmW4A4Scratch {
  void* split_k = nullptr;
  size_t split_k_bytes = 0;
  uint8_t* x_int8 = nullptr;
  size_t x_int8_bytes = 0;
  void* stream_k = nullptr;
  size_t stream_k_bytes = 0;
};
// split_k bytes for one shape (0 for M > 64).
size_t gemm_w4a4_split_k_bytes(int64_t M, int64_t N, int K, int keeper);
// x_int8 bytes for M rows of X (any M; Auto reads it only from kWgmmaMinM): gemm_w4a4_x_int8_bytes(T, K,
// keeper) serves every M <= T of that K and keeper.
size_t gemm_w4a4_x_int8_bytes(int64_t M, int K, int keeper);
// stream_k bytes for one shape's plan on this device, and a bound for every shape on it (what the
// executor allocates where its steps can have kWgmmaMinM rows or more).
size_t gemm_w4a4_stream_k_bytes(int64_t M, int64_t N, int K, int keeper);
size_t gemm_w4a4_stream_k_bytes_bound();
// The stream kernel's launch (M <= 16) for W of N x K on this device (gemm_w4a4_plan.h; the bench
// prints it).
StreamPlan gemm_w4a4_stream_plan(int64_t N, int K, int keeper);

// Throws nibble::Error on mismatched shapes, overlapping or too-small scratch, or a forced path that
// cannot take M (Stream: M <= 16, Decode: M <= 64). Asynchronous on `stream` (Wgmma: two kernels).
void gemm_w4a4(const AtomOperand& x, const AtomOperand& w, void* y, OutType out, const GemmW4A4Scratch& scratch,
               cudaStream_t stream, GemmPath path = GemmPath::Auto);

// X pre-widened to what the wgmma path's tensor cores read: per 128-token tile and slab one
// contiguous block of kXInt8BlockBytes, the slab's INT8 codes (16 * code for INT4 slabs, as the
// kernels widen them) in the canonical K-major wgmma B layout (x_int8_b_offset; keeper slabs fill
// k < 64, the rest zero), then the 128 tokens' scales in fp32 (the fp16 scales widened). Blocks
// ordered [token tile][slab]; tokens >= M hold code 0 and scale 0. Written by x_to_int8_b_layout
// (from the packed layout) or directly by the quantizers of norm_quantize.h.
inline constexpr int kXInt8TileTokens = 128;
inline constexpr int kXInt8CodeBytes = kXInt8TileTokens * 128;
inline constexpr int kXInt8BlockBytes = kXInt8CodeBytes + kXInt8TileTokens * 4;
// Byte of (token n < 128 of the tile, channel k < 128 of the slab) in its block: 8-token x 16-byte
// core matrices, core (k / 16, n / 8) at (k / 16) * 2048 + (n / 8) * 128.
__host__ __device__ constexpr int x_int8_b_offset(int n, int k) { return (k / 16) * 2048 + n * 16 + k % 16; }
// Byte offset of the block of (token tile, slab).
__host__ __device__ constexpr size_t x_int8_block_offset(int64_t token_tile, int slabs, int slab) {
  return (size_t(token_tile) * size_t(slabs) + size_t(slab)) * kXInt8BlockBytes;
}
struct XInt8Operand {
  const uint8_t* blocks = nullptr;  // gemm_w4a4_x_int8_bytes(shape.rows, shape.K, shape.keeper), 16-byte aligned
  AtomShape shape;                  // X's: atom_shape(M, K, keeper)
};

// Auto's choice of kernel reads X pre-widened (no repack needed) exactly when this holds: the
// executor quantizes straight into the B layout then and calls the XInt8Operand entry. The wgmma
// kernels cost one 128-token tile from M = 1 to 128; the decode kernel grows with M and steps up at
// M = 57 (8 m-tiles: 170 registers, fewer blocks an SM). Decode time / pre-widened wgmma time (v9 or
// stream-K, Auto's choice) on the H100, every 7B and 70B layer (bench_gemm_w4a4, session 22): M = 40
// 0.85-1.24, 48 0.88-1.01, 56 0.94-1.08 (7B under 1, 70B over), 64 0.97-1.59; the decode step of 8-layer
// 7B / 4-layer 70B synth models (bench_decode_step, ctx 512) with the switch at 49 instead: batch 56 1.5%
// slower, batch 64 1.10x (7B) and 1.20x (70B) faster. Hence from 57 rows.
inline constexpr int64_t kWgmmaMinM = 57;
inline constexpr int64_t kDecodeMaxM = 64;  // the decode kernel's limit (forced; Auto's is kWgmmaMinM - 1)
inline constexpr bool gemm_w4a4_takes_x_int8(int64_t M) { return M >= kWgmmaMinM; }

// Y = X·Wᵀ on the wgmma path from X already pre-widened (any M >= 1; one kernel, no repack). The
// result is gemm_w4a4(packed X, ..., path)'s bit for bit. `path`: Auto (Auto's choice from kWgmmaMinM rows),
// Wgmma or WgmmaStreamK (which needs scratch.stream_k; the other buffers are not used). Throws on
// mismatched shapes, a null / misaligned X, another path or a missing workspace. Asynchronous on `stream`.
void gemm_w4a4(const XInt8Operand& x, const AtomOperand& w, void* y, OutType out, cudaStream_t stream,
               GemmPath path = GemmPath::Auto, const GemmW4A4Scratch& scratch = {});

// The wgmma path's repack of X (GPU layout) into `out` (gemm_w4a4_x_int8_bytes), exposed for its
// test and the bench. Asynchronous on `stream`.
void x_to_int8_b_layout(const AtomOperand& x, uint8_t* out, cudaStream_t stream);

}  // namespace nibble::cuda
