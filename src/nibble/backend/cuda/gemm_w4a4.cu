#include "nibble/backend/cuda/gemm_w4a4.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include <cooperative_groups.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nibble/backend/cuda/cp_async.cuh"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/gemm_w4a4_plan.h"
#include "nibble/backend/cuda/half_pack.cuh"
#include "nibble/backend/cuda/wgmma.cuh"
#include "nibble/core/error.h"

namespace nibble::cuda {

namespace {

using namespace sm90;

// ---- Small device helpers ------------------------------------------------------------------------

// The INT8 fragment of the high nibbles (k = 4t..4t+3 of a k-step) and of the low nibbles
// (k = 16+4t..): each byte 16 * code, see atom_layout.h.
__device__ __forceinline__ uint32_t hi4(uint32_t w) { return w & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t lo4(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Weights are read exactly once: keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// float(i) for |i| < 2^22 with an integer add and a float add (full rate) instead of I2F (a
// quarter-rate conversion that bounded v1 of the prefill kernel). The int32 slab sums stay below
// 2^21 (INT4: 128 * 8 * 8 * 256, INT8 half slab: 64 * 128 * 128).
__device__ __forceinline__ float exact_float(int i) { return __int_as_float(i + 0x4B400000) - 12582912.0f; }

// How the wgmma fold converts its int32 slab sums (both exact, so the results are the same bits):
// MagicAdd is exact_float (IADD + FADD, two issue slots); Cvt is one cvt.rn.f32.s32 (I2FP.F32.S32 on
// sm_90, an ALU instruction: run 1 measured it 5% faster in the specialised kernel).
enum class IntToFloat { MagicAdd, Cvt };
template <IntToFloat kConv>
__device__ __forceinline__ float exact_float_by(int i) {
  if constexpr (kConv == IntToFloat::Cvt) return __int2float_rn(i);
  else return exact_float(i);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Scale group of slab s (INT4 groups first, then two slabs per keeper group).
__device__ __forceinline__ int slab_group(int s, int g4) { return s < g4 ? s : g4 + ((s - g4) >> 1); }

// The operands and the output, as every path reads them.
struct GemmOperands {
  const uint8_t* xq;
  const __half* xs;
  const uint8_t* wq;
  const __half* ws;
  int64_t M, x_rows_pad, N, w_rows_pad;
  int slabs, g4;
  void* y;
};

// ---- The 16-row W pair as the mma A operand (stream and decode kernels) -----------------------------

// One slab of a 16-row W pair (A: the lane's 16 bytes of each 8-row tile) times MT 8-token tiles (B)
// into c, as the decode and stream kernels both run it.
template <int MT, bool kInt4>
__device__ __forceinline__ void pair_slab_mma(const uint4& A0, const uint4& A1, const uint4 (&B)[MT],
                                              int (&c)[MT][4]) {
  if constexpr (kInt4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t a0 = hi4(word(A0, k)), a1 = hi4(word(A1, k)), a2 = lo4(word(A0, k)), a3 = lo4(word(A1, k));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_s8(c[mt], a0, a1, a2, a3, hi4(word(B[mt], k)), lo4(word(B[mt], k)));
    }
  } else {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const uint32_t a0 = word(A0, 2 * k), a1 = word(A1, 2 * k), a2 = word(A0, 2 * k + 1), a3 = word(A1, 2 * k + 1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_s8(c[mt], a0, a1, a2, a3, word(B[mt], 2 * k), word(B[mt], 2 * k + 1));
    }
  }
}

// acc += one slab's int32 products c (W rows g, g + 8 x tokens 2t, 2t + 1 of each m-tile) times the
// X scales sx (those two tokens) and the W scales of the two rows; f = 1/256 on an INT4 slab undoes
// the 16 * code widening (exact).
template <int MT>
__device__ __forceinline__ void fold_slab(const int (&c)[MT][4], const __half2 (&sx)[MT], float sw0, float sw1,
                                          float f, float (&acc)[MT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const float sx0 = __low2float(sx[mt]), sx1 = __high2float(sx[mt]);
    acc[mt][0] = fmaf(exact_float(c[mt][0]), (sx0 * sw0) * f, acc[mt][0]);
    acc[mt][1] = fmaf(exact_float(c[mt][1]), (sx1 * sw0) * f, acc[mt][1]);
    acc[mt][2] = fmaf(exact_float(c[mt][2]), (sx0 * sw1) * f, acc[mt][2]);
    acc[mt][3] = fmaf(exact_float(c[mt][3]), (sx1 * sw1) * f, acc[mt][3]);
  }
}

// ---- Weight streaming: M <= 16 --------------------------------------------------------------------
//
// A GEMV at heart: the time is W's bytes over DRAM bandwidth plus the fixed cost of one launch, so
// every SM must have its share of W requested from the first microsecond and nothing may add a
// round trip through global memory afterwards. The work unit is one (16-row W pair, slab) block of
// 1 KB: the pair's two 8-row tiles are the mma's A operand and the tokens its B operand (one 8-token
// tile at M <= 8, two at M <= 16), the decode kernel's mapping, so at M <= 8 no mma row is padding.
// (The tokens-as-A form it replaced spent ~145 issue slots on each 512-byte unit, as many as the
// transfer's time: bench/NOTES-gemm_w4a4.md, "Session 18" and "Session 19".) A block owns
// `pairs_per_block` consecutive pairs (one contiguous stretch of W) and its slab range; its warps cut
// that stretch into equal contiguous runs of units and stream them through a ring of kStreamRing
// units in registers, so all of a small layer's bytes are in flight at once. Sums are finished on
// chip: a pair cut between warps is summed through shared memory, a pair cut between the blocks of a
// cluster (split-K where N is small) through distributed shared memory, in a fixed order
// (deterministic, no workspace, no atomics). Launched with programmatic dependent launch: the W loads
// of the prologue overlap the previous kernel's tail, X is read only after griddepcontrol.wait.
// (kStreamWarps, kStreamRing, kStreamMaxPairs and the launch plan: gemm_w4a4_plan.h.)
static_assert(kStreamUnitBytes == 2 * kSlabBytes, "a unit is one slab of a 16-row W pair");

// X at M <= 16 has 16 padded rows; the kernel's offsets are 32-bit (launch_stream checks W's).
constexpr int kStreamXRowsPad = 16;
struct StreamParams : GemmOperands {
  int w_scale_stride;   // w_rows_pad, 32-bit
  int w_pairs;          // w_rows_pad / 16
  int pairs_per_block;  // W pairs per cluster (every block of a cluster has the same pairs)
  int cluster;          // blocks per cluster; rank r takes the r-th of `cluster` equal slab ranges
};

__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void grid_dependents_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// One unit's W as a lane holds it: its 16 bytes of each tile of the pair and the scales of its rows.
struct StreamUnitW {
  uint4 a0, a1;
  __half sw0, sw1;  // rows g and g + 8 of the pair
};

// A warp's walk over its units, pair-major with slabs s0..s1-1 inside; the lane's address in the
// pair's first tile is carried (one add a unit) instead of recomputed from (pair, slab).
struct StreamCursor {
  const uint8_t* w;
  int pair, slab;
  __device__ __forceinline__ void next(int slabs, int s0, int s1) {
    if (++slab == s1) {
      slab = s0;
      ++pair;
      w += size_t(2 * slabs - (s1 - s0) + 1) * kSlabBytes;
    } else {
      w += kSlabBytes;
    }
  }
};

__device__ __forceinline__ void stream_load(const StreamParams& p, const StreamCursor& c, int g, StreamUnitW& u) {
  u.a0 = ld_stream(c.w);
  u.a1 = ld_stream(c.w + size_t(p.slabs) * kSlabBytes);
  const __half* s = p.ws + (slab_group(c.slab, p.g4) * p.w_scale_stride + c.pair * 16 + g);
  u.sw0 = __ldg(s);
  u.sw1 = __ldg(s + 8);
}

// acc += the unit's product: W rows g, g + 8 of the pair x tokens 2t, 2t + 1 of each token tile.
template <int MT>
__device__ __forceinline__ void stream_unit(const StreamParams& p, const StreamUnitW& u, int slab, int lane,
                                            float (&acc)[MT][4]) {
  const uint8_t* xl = p.xq + (slab * kSlabBytes + lane * 16);
  const __half* sxp = p.xs + (slab_group(slab, p.g4) * kStreamXRowsPad + 2 * (lane % 4));
  uint4 B[MT];
  __half2 sx[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    B[mt] = __ldg(reinterpret_cast<const uint4*>(xl + mt * p.slabs * kSlabBytes));
    sx[mt] = *reinterpret_cast<const __half2*>(sxp + mt * 8);
  }
  int c[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0;
  const bool int4 = slab < p.g4;
  if (int4) pair_slab_mma<MT, true>(u.a0, u.a1, B, c);
  else pair_slab_mma<MT, false>(u.a0, u.a1, B, c);
  fold_slab<MT>(c, sx, __half2float(u.sw0), __half2float(u.sw1), int4 ? 1.0f / 256.0f : 1.0f, acc);
}

__device__ __forceinline__ void add_to(float4& s, const float4& v) {
  s.x += v.x;
  s.y += v.y;
  s.z += v.z;
  s.w += v.w;
}

// MT: token tiles (1 at M <= 8, 2 at M <= 16). Two blocks an SM (the plan counts on it).
template <int MT, typename OutT>
__global__ void __launch_bounds__(kStreamWarps * 32, 2) stream_kernel(StreamParams p) {
  namespace cg = cooperative_groups;
  __shared__ float4 pair_sum[kStreamMaxPairs][MT][32];  // the block's sum of each of its pairs
  __shared__ float4 part[kStreamWarps][2][MT][32];       // a warp's first and last pair when cut
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int rank = p.cluster > 1 ? int(cg::this_cluster().block_rank()) : 0;
  const int q0 = int(blockIdx.x) / p.cluster * p.pairs_per_block;
  const int npairs = min(p.pairs_per_block, p.w_pairs - q0);
  const int per_rank = (p.slabs + p.cluster - 1) / p.cluster;
  const int s0 = rank * per_rank, s1 = min(p.slabs, s0 + per_rank), ns = s1 - s0;
  const int nu = npairs * ns;
  const auto run_begin = [&](int w) { return w * nu / kStreamWarps; };
  const int u0 = run_begin(warp), count = run_begin(warp + 1) - u0;
  const int first_pair = u0 / ns, first_slab = s0 + u0 % ns;

  // Prologue: the first ring of W (constant) goes out before waiting on the kernel that wrote X.
  StreamUnitW ring[kStreamRing];
  StreamCursor ld{p.wq + (size_t(q0 + first_pair) * 2 * p.slabs + first_slab) * kSlabBytes + lane * 16,
                  q0 + first_pair, first_slab};
#pragma unroll
  for (int j = 0; j < kStreamRing; ++j)
    if (j < count) {
      stream_load(p, ld, g, ring[j]);
      ld.next(p.slabs, s0, s1);
    }
  grid_dependency_wait();
  grid_dependents_launch();

  int at_pair = first_pair, at_slab = first_slab;
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0;
  for (int i = 0; i < count; i += kStreamRing) {
#pragma unroll
    for (int j = 0; j < kStreamRing; ++j) {
      if (i + j >= count) break;
      stream_unit<MT>(p, ring[j], at_slab, lane, acc);
      if (i + j + kStreamRing < count) {
        stream_load(p, ld, g, ring[j]);
        ld.next(p.slabs, s0, s1);
      }
      if (at_slab + 1 == s1 || i + j + 1 == count) {  // the pair ends here, or the warp's run does
        const int first = at_pair * ns;
        const bool whole = first >= u0 && first + ns <= u0 + count;
        float4* dst = whole ? pair_sum[at_pair][0] : part[warp][at_pair == first_pair ? 0 : 1][0];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          dst[mt * 32 + lane] = make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]);
          acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0;
        }
      }
      if (++at_slab == s1) {
        at_slab = s0;
        ++at_pair;
      }
    }
  }
  __syncthreads();
  // Pairs cut between warps: their pieces summed in warp order.
  for (int pl = warp; pl < npairs; pl += kStreamWarps) {
    const int a = pl * ns, b = a + ns;
    float4 s[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) s[mt] = make_float4(0, 0, 0, 0);
    bool whole = false;
    for (int w = 0; w < kStreamWarps; ++w) {
      const int w0 = run_begin(w), w1 = run_begin(w + 1);
      if (w0 == w1 || w1 <= a || w0 >= b) continue;
      whole = w0 <= a && w1 >= b;
      if (whole) break;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) add_to(s[mt], part[w][pl == w0 / ns ? 0 : 1][mt][lane]);
    }
    if (!whole)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) pair_sum[pl][mt][lane] = s[mt];
  }
  __syncthreads();
  if (p.cluster > 1) cg::this_cluster().sync();  // every rank's pair sums are final

  OutT* y = static_cast<OutT*>(p.y);
  for (int pl = warp; pl < npairs; pl += kStreamWarps) {
    if (pl % p.cluster != rank) continue;  // each rank finishes every cluster-th pair
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float4 s = pair_sum[pl][mt][lane];
      if (p.cluster > 1) {  // K was split over the cluster: ranks summed in rank order
        s = make_float4(0, 0, 0, 0);
        for (int r = 0; r < p.cluster; ++r) add_to(s, *cg::this_cluster().map_shared_rank(&pair_sum[pl][mt][lane], r));
      }
      const float v[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = mt * 8 + 2 * t + (i & 1), n = int64_t(q0 + pl) * 16 + g + (i >> 1) * 8;
        if (m < p.M && n < p.N) y[m * p.N + n] = from_float<OutT>(v[i]);
      }
    }
  }
  if (p.cluster > 1) cg::this_cluster().sync();  // no block leaves while its shared memory is read
}

// ---- Decode: M <= 64 ---------------------------------------------------------------------------------

struct DecodeParams : GemmOperands {
  int splits, slabs_per_split;
  float* partial;  // [splits][gridDim.x][8 warps][MT][32 lanes] float4
  int* counters;   // [gridDim.x], zero between launches
};

constexpr int kDecodeWarps = 8;  // one 16-row W tile each: 128 rows of N per block

// v2/v5 decode: every warp streams its 16-row W tile through registers, U slabs per batch with all
// their loads (W, X fragments, scales) issued before the math. (v3/v4 staged W, then W + X +
// scales, through a per-warp cp.async ring in shared memory: slower on every shape, see
// bench/NOTES-gemm_w4a4.md.)
// U slabs starting at s (those below `end`): all loads first (U * (2 + MT) 16-byte loads in flight
// per lane), then the math. Slabs past `end` load nothing and add zero.
template <int MT, int U, bool kInt4>
__device__ __forceinline__ void decode_slabs(const DecodeParams& p, int s, int end, const uint8_t* wa,
                                             const uint8_t* wb, const uint8_t* xl, int n0, int lane,
                                             float (&acc)[MT][4]) {
  uint4 A0[U], A1[U], B[U][MT];
  float sw0[U], sw1[U];
  __half2 sx[U][MT];
  const int t = lane % 4;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const bool ok = s + u < end;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    A0[u] = ok ? ld_stream(wa + size_t(s + u) * kSlabBytes) : zero;
    A1[u] = ok ? ld_stream(wb + size_t(s + u) * kSlabBytes) : zero;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      B[u][mt] = ok ? __ldg(reinterpret_cast<const uint4*>(xl + (size_t(mt) * p.slabs + s + u) * kSlabBytes)) : zero;
    const int grp = slab_group(ok ? s + u : s, p.g4);
    sw0[u] = ok ? __half2float(p.ws[size_t(grp) * p.w_rows_pad + n0]) : 0.f;
    sw1[u] = ok ? __half2float(p.ws[size_t(grp) * p.w_rows_pad + n0 + 8]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      sx[u][mt] = *reinterpret_cast<const __half2*>(p.xs + size_t(grp) * p.x_rows_pad + mt * 8 + 2 * t);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    int c[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0;
    pair_slab_mma<MT, kInt4>(A0[u], A1[u], B[u], c);
    fold_slab<MT>(c, sx[u], sw0[u], sw1[u], kInt4 ? 1.0f / 256.0f : 1.0f, acc);
  }
}

// ptxas gives MT = 5 80 registers (3 blocks an SM) and an 8-byte spill of tile16 around the slab loops; a
// 32-bit n0 removed the spill but took 88 registers (2 blocks an SM) and was 12-39% slower at M = 40 (H100,
// session 22), so the spill stays.
template <int MT, typename OutT>
__global__ void __launch_bounds__(kDecodeWarps * 32) decode_kernel(DecodeParams p) {
  constexpr int U = MT <= 2 ? 4 : MT <= 4 ? 2 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t tile16 = int64_t(blockIdx.x) * kDecodeWarps + warp;
  const bool active = tile16 * 16 < p.w_rows_pad;
  const int s0 = blockIdx.y * p.slabs_per_split, s1 = min(p.slabs, s0 + p.slabs_per_split);
  const int64_t n0 = tile16 * 16 + g;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0;

  if (active) {
    const uint8_t* wa = p.wq + size_t(tile16 * 2) * p.slabs * kSlabBytes + lane * 16;
    const uint8_t* wb = wa + size_t(p.slabs) * kSlabBytes;
    const uint8_t* xl = p.xq + lane * 16;
    const int e4 = min(s1, p.g4);
    for (int s = s0; s < e4; s += U) decode_slabs<MT, U, true>(p, s, e4, wa, wb, xl, int(n0), lane, acc);
    for (int s = max(s0, p.g4); s < s1; s += 2) decode_slabs<MT, 2, false>(p, s, s1, wa, wb, xl, int(n0), lane, acc);
  }

  if (p.splits > 1) {
    float4* part = reinterpret_cast<float4*>(p.partial);
    const size_t stride_split = size_t(gridDim.x) * kDecodeWarps * MT * 32;
    const size_t mine = (size_t(blockIdx.x) * kDecodeWarps + warp) * MT * 32 + lane;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      __stcg(part + blockIdx.y * stride_split + mine + mt * 32,
             make_float4(acc[mt][0], acc[mt][1], acc[mt][2], acc[mt][3]));
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (threadIdx.x == 0) is_last = atomicAdd(&p.counters[blockIdx.x], 1) == p.splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // The last block of this column range sums the splits in order: deterministic.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0;
    for (int z0 = 0; z0 < p.splits; z0 += 4) {  // 4 * MT loads in flight, summed in split order
      float4 v[4][MT];
#pragma unroll
      for (int dz = 0; dz < 4; ++dz)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          v[dz][mt] = z0 + dz < p.splits ? __ldcg(part + (z0 + dz) * stride_split + mine + mt * 32)
                                         : make_float4(0, 0, 0, 0);
#pragma unroll
      for (int dz = 0; dz < 4; ++dz)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[mt][0] += v[dz][mt].x;
          acc[mt][1] += v[dz][mt].y;
          acc[mt][2] += v[dz][mt].z;
          acc[mt][3] += v[dz][mt].w;
        }
    }
    if (threadIdx.x == 0) p.counters[blockIdx.x] = 0;
  }
  if (!active) return;
  OutT* y = static_cast<OutT*>(p.y);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int64_t m = mt * 8 + 2 * t;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t mm = m + (i & 1), nn = n0 + (i >> 1) * 8;
      if (mm < p.M && nn < p.N) y[mm * p.N + nn] = from_float<OutT>(acc[mt][i]);
    }
  }
}

struct DecodePlan {
  int nblocks, splits, slabs_per_split, mt;
};

int sm_count() {
  static int count = [] {
    int dev = 0, n = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&dev));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }();
  return count;
}

// Resident decode blocks per SM for an m-tile count (occupancy of the fp16 instance; bf16's is the
// same kernel but for the final conversion).
template <int MT>
int decode_blocks_per_sm_mt() {
  static int n = [] {
    int b = 0;
    NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, decode_kernel<MT, __half>, kDecodeWarps * 32, 0));
    return std::max(b, 1);
  }();
  return n;
}
int decode_blocks_per_sm(int mt) {
  switch (mt) {
    case 1: return decode_blocks_per_sm_mt<1>();
    case 2: return decode_blocks_per_sm_mt<2>();
    case 3: return decode_blocks_per_sm_mt<3>();
    case 4: return decode_blocks_per_sm_mt<4>();
    case 5: return decode_blocks_per_sm_mt<5>();
    case 6: return decode_blocks_per_sm_mt<6>();
    case 7: return decode_blocks_per_sm_mt<7>();
    default: return decode_blocks_per_sm_mt<8>();
  }
}

// Split-K: every warp streams its slabs latency-bound (a few KB in flight), so the time of a split
// count is modelled as the waves of resident blocks (SMs x blocks per SM) times the slabs each
// block streams plus a fixed per-block cost (launch, partial-sum store, reduction: ~2 slabs).
// v2 counted waves over SMs only and picked too few blocks for long K (70B down at 39% of copy
// bandwidth with 128 blocks of 113 slabs).
DecodePlan decode_plan(int64_t M, int64_t n_rows_pad, int slabs) {
  DecodePlan d;
  d.mt = int((M + 7) / 8);
  d.nblocks = int((n_rows_pad + 16 * kDecodeWarps - 1) / (16 * kDecodeWarps));
  const int slots = sm_count() * decode_blocks_per_sm(std::min(d.mt, 8));
  int best = 1;
  double best_cost = 1e30;
  for (int splits = 1; splits <= std::min(32, std::max(1, slabs / 2)); ++splits) {
    const int sps = (slabs + splits - 1) / splits;
    const int real = (slabs + sps - 1) / sps;
    const double waves = double((int64_t(d.nblocks) * real + slots - 1) / slots);
    const double cost = waves * (sps + 2.0);
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      best = real;
    }
  }
  d.slabs_per_split = (slabs + best - 1) / best;
  d.splits = (slabs + d.slabs_per_split - 1) / d.slabs_per_split;
  return d;
}

size_t decode_workspace(const DecodePlan& d) {
  if (d.splits <= 1) return 0;
  const size_t counters = round_up(int64_t(d.nblocks) * 4, 256);
  return counters + size_t(d.splits) * d.nblocks * kDecodeWarps * d.mt * 32 * 16;
}

template <int MT, typename OutT>
void launch_decode_mt(const DecodeParams& p, dim3 grid, dim3 block, cudaStream_t stream) {
  decode_kernel<MT, OutT><<<grid, block, 0, stream>>>(p);
}

template <typename OutT>
void launch_decode(DecodeParams p, const DecodePlan& d, cudaStream_t stream) {
  const dim3 grid(d.nblocks, d.splits), block(kDecodeWarps * 32);
  switch (d.mt) {
#define NIBBLE_DECODE_CASE(MT) \
  case MT: launch_decode_mt<MT, OutT>(p, grid, block, stream); break;
    NIBBLE_DECODE_CASE(1)
    NIBBLE_DECODE_CASE(2)
    NIBBLE_DECODE_CASE(3)
    NIBBLE_DECODE_CASE(4)
    NIBBLE_DECODE_CASE(5)
    NIBBLE_DECODE_CASE(6)
    NIBBLE_DECODE_CASE(7)
    NIBBLE_DECODE_CASE(8)
#undef NIBBLE_DECODE_CASE
    default: throw Error("gemm_w4a4", cformat("decode path needs M <= 64, got {}", p.M));
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

// X is read through L1 by every unit, so L1 must hold it: ask for the smallest shared-memory
// carveout that still fits the blocks the registers allow (2 x 28 KB of the 228), not one sized for
// the 8 blocks the thread count would allow (device run 1: 41-50% of copy bandwidth where the v5
// kernel, which has no shared memory, streamed at 76%).
constexpr int kStreamCarveoutPercent = 25;
template <int MT, typename OutT>
void configure_stream_kernel() {
  static bool done = [] {
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(stream_kernel<MT, OutT>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           kStreamCarveoutPercent));
    return true;
  }();
  (void)done;
}

// Resident blocks an SM of the larger instance (two: the kernel's launch bounds).
int stream_blocks_per_sm() {
  static int n = [] {
    configure_stream_kernel<2, __half>();
    int b = 0;
    NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, stream_kernel<2, __half>, kStreamWarps * 32, 0));
    return std::max(b, 1);
  }();
  return n;
}

StreamPlan stream_plan_on_device(int64_t w_pairs, int slabs) {
  return stream_plan(w_pairs, slabs, sm_count(), stream_blocks_per_sm());
}

template <int MT, typename OutT>
void launch_stream_t(const StreamParams& p, const StreamPlan& d, cudaStream_t stream) {
  configure_stream_kernel<MT, OutT>();
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(d.blocks));
  cfg.blockDim = dim3(kStreamWarps * 32);
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[0].val.programmaticStreamSerializationAllowed = 1;
  attrs[1].id = cudaLaunchAttributeClusterDimension;
  attrs[1].val.clusterDim.x = unsigned(d.cluster);
  attrs[1].val.clusterDim.y = attrs[1].val.clusterDim.z = 1;
  cfg.attrs = attrs;
  cfg.numAttrs = d.cluster > 1 ? 2 : 1;
  NIBBLE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, stream_kernel<MT, OutT>, p));
}

void launch_stream(const GemmOperands& ops, OutType out, cudaStream_t stream) {
  require(ops.x_rows_pad == kStreamXRowsPad && int64_t(ops.slabs) * ops.w_rows_pad < (int64_t(1) << 31),
          "gemm_w4a4", "the stream kernel takes at most 16 tokens and 2^31 W scales, got {} padded rows x {} slabs",
          ops.w_rows_pad, ops.slabs);
  StreamParams p{ops};
  p.w_scale_stride = int(ops.w_rows_pad);
  p.w_pairs = int(ops.w_rows_pad / (2 * kRowTile));
  const StreamPlan d = stream_plan_on_device(p.w_pairs, ops.slabs);
  p.pairs_per_block = d.pairs_per_block;
  p.cluster = d.cluster;
  const bool tok16 = ops.M > 8;
  if (out == OutType::F16) {
    if (tok16) launch_stream_t<2, __half>(p, d, stream);
    else launch_stream_t<1, __half>(p, d, stream);
  } else {
    if (tok16) launch_stream_t<2, __nv_bfloat16>(p, d, stream);
    else launch_stream_t<1, __nv_bfloat16>(p, d, stream);
  }
}

// ---- Block tiles of the wgmma kernels: 128 W rows x 128 tokens, one cp.async stage per slab ---------
//
// (v1-v5 ran them on `mma.sync` in 8 or 16 warps; the wgmma kernel below replaced those, measured
// equal or faster on every shape of device run 1, and they were deleted.)

constexpr int kBN = 128, kBM = 128;
static_assert(kBN == kWgmmaTile && kBM == kWgmmaTile, "gemm_w4a4_plan.h counts tiles of this size");
constexpr int kTileBytes = (kBN / kRowTile) * kSlabBytes;      // 8 KB of W (and of X) per slab
constexpr int kStageBytes = 2 * kTileBytes + (kBN + kBM) * 2;  // + the slab's scales
constexpr int kUnpackBytes = kXInt8CodeBytes;  // one slab of X as INT8, 128 tokens x 128 channels
static_assert(kXInt8BlockBytes == kUnpackBytes + kBM * 4, "a pre-widened X block: INT8 slab, then fp32 scales");

// Where a pipeline stage keeps one slab of the block tile. Packed (v6, the lockstep oracle): W's and
// X's tiles as stored, then their fp16 scales. XInt8 (v9, the specialised kernel): W's tile, X's
// pre-widened block (INT8 codes in the wgmma B layout, then fp32 scales: copied as it is, the
// consumers read it in place), W's scales.
struct PackedStage {
  static constexpr bool kPackedX = true;
  static constexpr int kWScales = 2 * kTileBytes, kBytes = kStageBytes;
};
struct XInt8Stage {
  static constexpr bool kPackedX = false;
  static constexpr int kXBlock = kTileBytes, kWScales = kXBlock + kXInt8BlockBytes, kBytes = kWScales + kBN * 2;
};
static_assert(PackedStage::kBytes == PackedStage::kWScales + (kBN + kBM) * 2 && XInt8Stage::kBytes % 128 == 0,
              "stage layouts");

// Slab s of the block tile into `stage` by kThreads threads (16-byte cp.async; rows past the
// padded ones zero-filled): W's codes and scales, and X's where the stage keeps X packed.
template <int kThreads, typename Stage = PackedStage>
__device__ __forceinline__ void block_tile_load(const GemmOperands& p, uint8_t* stage, int s, int64_t n_base,
                                             int64_t m_base) {
  const int tid = threadIdx.x;
  const int grp = slab_group(s, p.g4);
#pragma unroll
  for (int i = 0; i < 512 / kThreads; ++i) {  // 512 chunks of 16 bytes per operand
    const int c = tid + i * kThreads;
    const int tile = c / 32, l = c % 32;
    const int64_t wt = n_base / kRowTile + tile, xt = m_base / kRowTile + tile;
    const bool wv = wt * kRowTile < p.w_rows_pad, xv = xt * kRowTile < p.x_rows_pad;
    cp_async16(stage + c * 16, p.wq + ((wv ? wt : 0) * p.slabs + s) * size_t(kSlabBytes) + l * 16, wv ? 16 : 0);
    if constexpr (Stage::kPackedX)
      cp_async16(stage + kTileBytes + c * 16, p.xq + ((xv ? xt : 0) * p.slabs + s) * size_t(kSlabBytes) + l * 16, xv ? 16 : 0);
  }
  if (tid < (Stage::kPackedX ? 32 : 16)) {  // 16 chunks of W scales, 16 of X scales (8 halves each)
    const bool is_w = tid < 16;
    const int c = tid % 16;
    const int64_t row = (is_w ? n_base : m_base) + c * 8;
    const bool v = row < (is_w ? p.w_rows_pad : p.x_rows_pad);
    const __half* src = (is_w ? p.ws + size_t(grp) * p.w_rows_pad : p.xs + size_t(grp) * p.x_rows_pad) + (v ? row : 0);
    cp_async16(stage + Stage::kWScales + (is_w ? 0 : kBN * 2) + c * 16, src, v ? 16 : 0);
  }
}

// ---- wgmma (sm_90a): Auto's from kWgmmaMinM rows -------------------------------------------------------
//
// Yᵀ = W·Xᵀ on `wgmma.mma_async.m64n128k32.s32.s8.s8`: W rows are wgmma's M (a warpgroup takes 64
// rows: each warp's 16-row tile is, in our slab layout, exactly its register-A fragment after the
// two-LOP widening), the tokens are its N (128 per block), X its shared-memory B operand. Per slab
// the block unpacks X's INT4 codes (16 * code per byte, as for A) into the canonical K-major
// no-swizzle layout (8 tokens x 16 bytes core matrices: core (kc, j) at kc * 2048 + j * 128, so
// LBO = 2048 between K halves and SBO = 128 between token groups); keeper slabs are copied as they
// are. Each warpgroup issues the slab's 4 wgmma (a keeper slab's last two on zero A), waits for
// them and folds the int32 sums into fp32 with the per-row x per-token scales (DeepGEMM's
// promotion). This lockstep kernel is the tests' bit-identity oracle; the warp-specialised one
// below (v9) takes the same steps without block barriers, each warpgroup's fold under the other's
// MMAs. Operands come through 128x128 cp.async stages. Where the tiles do not fill the SMs, K is
// split over a cluster.
constexpr int kWgThreads = 256;     // two warpgroups: W rows 0..63 and 64..127 of the block
constexpr int kWgStages = 5;        // cp.async stages (prefetch distance kWgStages - 2)
constexpr int kWgSmem = kWgStages * kStageBytes + 2 * kUnpackBytes;

__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  // K-direction and token-direction core-matrix strides, no swizzle
  return sm90::smem_desc(sm90::smem_addr(p), 2048, 128, sm90::Swizzle::None);
}

// d (+)= A (registers, 64 x 32) · B (shared memory, 32 x 128): accumulate unless `zero`.
__device__ __forceinline__ void wgmma_s8(int (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint64_t desc, bool zero) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.eq.u32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(uint32_t(zero)));
}

// d (+)= A (registers, 64 x 32) · B (shared memory, 32 x 64 tokens): half of a block tile's tokens.
__device__ __forceinline__ void wgmma_s8(int (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint64_t desc, bool zero) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.eq.u32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(uint32_t(zero)));
}

// A lane's 16 bytes v of a packed 8-token tile -> `base`, its place in the slab's canonical layout
// (tile * 128 + r * 16 + t * 4 bytes into it).
__device__ __forceinline__ void store_int8_b(const uint4& v, uint8_t* base, bool int4) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (int4) {
      *reinterpret_cast<uint32_t*>(base + (2 * j) * 2048) = hi4(word(v, j));
      *reinterpret_cast<uint32_t*>(base + (2 * j + 1) * 2048) = lo4(word(v, j));
    } else {
      *reinterpret_cast<uint32_t*>(base + j * 2048) = word(v, j);
    }
  }
}
// X's slab in the stage (16 packed 8-token tiles) -> INT8 in the canonical layout; warp w of the
// kWarps unpacking takes tiles w * 16 / kWarps and on. A lane's word s of an INT4 slab holds its
// token's channels 32s + 4t.. (high nibbles: core kc = 2s) and 32s + 16 + 4t.. (low nibbles: kc =
// 2s + 1); word j of a keeper slab is core kc = j as it is.
template <int kWarps>
__device__ __forceinline__ void unpack_x(const uint8_t* packed, uint8_t* out, bool int4, int warp, int lane) {
  constexpr int kTiles = (kBM / kRowTile) / kWarps;
  const int r = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    const int tile = kTiles * warp + i;
    const uint4 v = *reinterpret_cast<const uint4*>(packed + tile * kSlabBytes + lane * 16);
    store_int8_b(v, out + tile * 128 + r * 16 + t * 4, int4);
  }
}

// The A fragments of this warp's 16 W rows of a slab (the stage's), widened for all four k-steps. A
// keeper slab fills k-steps 0, 1; its k-steps 2, 3 are zero, so every slab issues four wgmma with no
// branch around them: such a branch made ptxas close each slab's commit group in three (with a dummy
// HGMMA), and `wait_group 1` then waited for the group just issued — no fold ran under an MMA
// (bench/NOTES-gemm_w4a4.md, sessions 17-19). Widened before the fence: registers written after it
// would need another.
__device__ __forceinline__ void widen_a(uint32_t (&a)[4][4], const uint8_t* stage, bool int4, int wtile, int lane) {
  const uint4 A0 = *reinterpret_cast<const uint4*>(stage + wtile * kSlabBytes + lane * 16);
  const uint4 A1 = *reinterpret_cast<const uint4*>(stage + (wtile + 1) * kSlabBytes + lane * 16);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (int4) {
      a[k][0] = hi4(word(A0, k)), a[k][1] = hi4(word(A1, k)), a[k][2] = lo4(word(A0, k)), a[k][3] = lo4(word(A1, k));
    } else if (k < 2) {
      a[k][0] = word(A0, 2 * k), a[k][1] = word(A1, 2 * k), a[k][2] = word(A0, 2 * k + 1), a[k][3] = word(A1, 2 * k + 1);
    } else {
      a[k][0] = a[k][1] = a[k][2] = a[k][3] = 0;
    }
  }
}

// A slab's four k-steps into d (all 128 tokens of the tile, or a 64-token half: d's size picks the
// wgmma), one commit group; B at x_desc, the descriptor of the slab's X, whose k-step k starts
// 2 * 2048 * k bytes further.
template <int R>
__device__ __forceinline__ void issue_wgmma(int (&d)[R], const uint32_t (&a)[4][4], uint64_t x_desc) {
  wgmma_fence();
  fence_regs(d);
#pragma unroll
  for (int k = 0; k < 4; ++k) wgmma_s8(d, a[k][0], a[k][1], a[k][2], a[k][3], x_desc + (2 * k * 2048 >> 4), k == 0);
  wgmma_commit();
  fence_regs(d);
}

// The x scales of tokens i, i + 1 (i even): fp16 as loaded (wgmma_kernel) or already converted to
// fp32 by the repack (wgmma_specialized_kernel: 32 conversions a thread and slab fewer).
__device__ __forceinline__ float2 x_scale_pair(const __half* xs, int i) {
  return __half22float2(*reinterpret_cast<const __half2*>(xs + i));
}
__device__ __forceinline__ float2 x_scale_pair(const float* xs, int i) { return *reinterpret_cast<const float2*>(xs + i); }

// acc += d · sw[row] · sx[token] (· 2^-8 for INT4 slabs) over kJ groups of 8 tokens from group kJ0:
// the lane holds rows g, g + 8 of its warp's 16 and tokens 8j + 2t, 8j + 2t + 1 (acc[4j ..], d[4(j -
// kJ0) ..]). W scales from sws (the stage's), X scales from xs. Every element gets the same
// operations whichever part of the tile a call folds.
template <IntToFloat kConv, int kJ, int kJ0 = 0, typename XScale>
__device__ __forceinline__ void wgmma_fold(float (&acc)[64], const int (&d)[4 * kJ], const __half* sws,
                                           const XScale* xs, bool int4, int wrow, int lane) {
  const float f = int4 ? 1.0f / 256.0f : 1.0f;  // exact: undoes the 16 * code widening
  const float sw0 = __half2float(sws[wrow]) * f, sw1 = __half2float(sws[wrow + 8]) * f;
  const int t = lane % 4;
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    const float2 x = x_scale_pair(xs, 8 * (kJ0 + j) + 2 * t);
    float* o = acc + 4 * (kJ0 + j);
    o[0] = fmaf(exact_float_by<kConv>(d[4 * j + 0]), sw0 * x.x, o[0]);
    o[1] = fmaf(exact_float_by<kConv>(d[4 * j + 1]), sw0 * x.y, o[1]);
    o[2] = fmaf(exact_float_by<kConv>(d[4 * j + 2]), sw1 * x.x, o[2]);
    o[3] = fmaf(exact_float_by<kConv>(d[4 * j + 3]), sw1 * x.y, o[3]);
  }
}
// The fp16 W and X scales of a packed stage.
__device__ __forceinline__ const __half* stage_w_scales(const uint8_t* stage) {
  return reinterpret_cast<const __half*>(stage + PackedStage::kWScales);
}
__device__ __forceinline__ const __half* stage_x_scales(const uint8_t* stage) { return stage_w_scales(stage) + kBN; }

struct WgmmaParams : GemmOperands {
  int cluster;         // blocks per cluster, splitting K: rank r takes slabs [r * per_rank, (r + 1) * per_rank)
  int slabs_per_rank;
  const uint8_t* x_int8;  // specialised kernel: X pre-widened ([128-token tile][slab] blocks), read instead of xq, xs
};
constexpr int kPartPitch = kBN + 4;  // floats; conflict-free staging of the fp32 tile
static_assert(kBM * kPartPitch * 4 <= kWgSmem, "the fp32 tile must fit in the pipeline buffers");

// Epilogue of both wgmma kernels (called by every thread of the block after the main loop, with
// the pipeline buffers free): the fp32 tile staged as part[m][n] by the threads holding
// accumulators (`has_acc`: rows wrow, wrow + 8, tokens 8j + 2t, 8j + 2t + 1); rank r sums token rows
// [r, r + 1) * 128 / cluster over the cluster's ranks in rank order (deterministic) and writes them
// in 16-byte row stores, threads `store_tid` of `store_threads` (store_tid < 0: none).
template <typename OutT>
__device__ __forceinline__ void write_block_tile(const WgmmaParams& p, uint8_t* smem, const float (&acc)[64],
                                                 bool has_acc, int wrow, int lane, int rank, int64_t n_base,
                                                 int64_t m_base, int store_tid, int store_threads) {
  namespace cg = cooperative_groups;
  float* part = reinterpret_cast<float*>(smem);
  const int t = lane % 4;
  if (has_acc) {
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[(8 * j + 2 * t + (e & 1)) * kPartPitch + wrow + (e >> 1) * 8] = acc[4 * j + e];
  }
  if (p.cluster > 1) cg::this_cluster().sync();
  else __syncthreads();
  OutT* y = static_cast<OutT*>(p.y);
  const int rows = kBM / p.cluster;
  for (int c = store_tid; store_tid >= 0 && c < rows * (kBN / 8); c += store_threads) {
    const int m = rank * rows + c / (kBN / 8), n = (c % (kBN / 8)) * 8;
    const int64_t gm = m_base + m, gn = n_base + n;
    if (gm >= p.M) continue;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int r = 0; r < p.cluster; ++r) {
      const float* src = (p.cluster > 1 ? cg::this_cluster().map_shared_rank(part, r) : part) + m * kPartPitch + n;
      const float4 lo = *reinterpret_cast<const float4*>(src), hi = *reinterpret_cast<const float4*>(src + 4);
      v[0] += lo.x, v[1] += lo.y, v[2] += lo.z, v[3] += lo.w, v[4] += hi.x, v[5] += hi.y, v[6] += hi.z, v[7] += hi.w;
    }
    alignas(16) OutT o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = from_float<OutT>(v[e]);
    if (gn + 8 <= p.N && p.N % 8 == 0) {
      *reinterpret_cast<uint4*>(y + gm * p.N + gn) = *reinterpret_cast<const uint4*>(o);
    } else {
      for (int e = 0; e < 8 && gn + e < p.N; ++e) y[gm * p.N + gn + e] = o[e];
    }
  }
  if (p.cluster > 1) cg::this_cluster().sync();  // no block leaves while its tile is read
}

// This block's tile of a (cluster, W tiles, token tiles) grid, in wgmma_tile_of_block's order.
__device__ __forceinline__ WgmmaTileOfBlock grid_tile() {
  return wgmma_tile_of_block(int(blockIdx.y + blockIdx.z * gridDim.y), int(gridDim.y), int(gridDim.z));
}

template <typename OutT>
__global__ void __launch_bounds__(kWgThreads, 1) wgmma_kernel(WgmmaParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* unpacked = smem + kWgStages * kStageBytes;  // two slabs: i % 2
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wtile = warp * 2;                                   // the warp's first 8-row W tile in the block
  const int wrow = warp * 16 + lane / 4;                        // the lane's first W row in the block
  const int rank = int(blockIdx.x);                             // the cluster spans x
  const WgmmaTileOfBlock tile = grid_tile();
  const int64_t n_base = int64_t(tile.n_tile) * kBN, m_base = int64_t(tile.m_tile) * kBM;
  const int s0 = rank * p.slabs_per_rank, ns = min(p.slabs, s0 + p.slabs_per_rank) - s0;

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0;
  int d[64];

#pragma unroll
  for (int i = 0; i < kWgStages - 2; ++i) {
    if (i < ns) block_tile_load<kWgThreads>(p, smem + i * kStageBytes, s0 + i, n_base, m_base);
    cp_async_commit();
  }
  // Slab s0 + i: stage ready, prefetch, unpack X, issue its wgmma, wait for them, fold.
  for (int i = 0; i < ns; ++i) {
    cp_async_wait<kWgStages - 3>();
    __syncthreads();  // stage i landed; slab i - 2's wgmma (unpacked buffer i % 2) are done in both warpgroups
    const int next = i + kWgStages - 2;
    if (next < ns) block_tile_load<kWgThreads>(p, smem + (next % kWgStages) * kStageBytes, s0 + next, n_base, m_base);
    cp_async_commit();
    const uint8_t* stage = smem + (i % kWgStages) * kStageBytes;
    uint8_t* ubuf = unpacked + (i % 2) * kUnpackBytes;
    const bool int4 = s0 + i < p.g4;
    unpack_x<kWgThreads / 32>(stage + kTileBytes, ubuf, int4, warp, lane);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic writes -> wgmma's async proxy
    __syncthreads();
    uint32_t a[4][4];
    widen_a(a, stage, int4, wtile, lane);
    issue_wgmma(d, a, smem_desc(ubuf));
    wgmma_wait<0>();
    fence_regs(d);
    wgmma_fold<IntToFloat::MagicAdd, 16>(acc, d, stage_w_scales(stage), stage_x_scales(stage), int4, wrow, lane);
  }
  cp_async_wait<0>();
  __syncthreads();

  write_block_tile<OutT>(p, smem, acc, true, wrow, lane, rank, n_base, m_base, threadIdx.x, kWgThreads);
}

// ---- Warp-specialised wgmma (v9) ---------------------------------------------------------------------
//
// The same block tile, slab order, wgmma issue and fold as wgmma_kernel, the lockstep v6 kept as the
// tests' oracle (bit-identical results), but no block barrier in the main loop, and X arrives
// pre-widened (x_to_int8_b_layout, below, run just before on the same stream): per slab one block
// of INT8 codes in the wgmma B layout + fp32 scales, which the consumers read in place. Warpgroup 0
// is the producer and only copies: thread 0 one 1-D bulk copy of the slab's X block (16.5 KB,
// counted in bytes on `loaded`), all 128 threads W's tile and scales by cp.async (each thread's
// completion one arrival on `loaded`), into a ring of kSpP stages, refilled as soon as the
// consumers release a stage (`consumed`, one arrival per consumer warp). Warpgroups 1 and 2 only
// widen W, issue wgmma and fold. setmaxnreg moves registers from the producer (40) to the consumers
// (232). History: v6 (lockstep) 2660 clocks per slab; v7 (this kernel with the producer unpacking X
// into a second ring) 2012, 1.15-1.28x v6; v9 (X pre-widened) ~1390, 1.16-1.71x v7 on all 21 benched
// shapes, the repack (4-51 µs) not counted (H200, session 12; bench/NOTES-gemm_w4a4.md).
constexpr int kSpThreads = 384;  // producer warpgroup + two consumer warpgroups (W rows 0..63, 64..127)
// Registers a thread after setmaxnreg: the producer warpgroup gives, the two consumer warpgroups take
// (40 + 2 x 232 = 3 x 168, the 384-thread launch's share).
constexpr int kSpProducerRegs = 40, kSpConsumerRegs = 232;
static_assert(kSpProducerRegs + 2 * kSpConsumerRegs <= 3 * (65536 / 384 / 8 * 8), "register file");
constexpr int kSpP = 8;          // stages (W tile, X block, W scales of a slab)
constexpr int kSpSmem = kSpP * XInt8Stage::kBytes + 2 * kSpP * 8;  // stages, loaded[P], consumed[P]
static_assert(kBM * kPartPitch * 4 <= kSpP * XInt8Stage::kBytes, "the fp32 tile must fit in the stages");
static_assert(kSpSmem <= 227 * 1024, "shared memory per block");

// Where slab i (>= 0) sits in the ring, and the parity of its use of the stage (use n of a stage
// completes its barriers' phase n). Unsigned, so the modulo is one AND.
struct SpRing {
  unsigned p, p_phase;
  __device__ __forceinline__ explicit SpRing(int i) : p(unsigned(i) % kSpP), p_phase(unsigned(i) / kSpP & 1) {}
};

// The specialised kernels' shared memory: the ring of kSpP stages, then its barriers.
struct SpShared {
  uint8_t* smem;
  uint64_t* loaded;    // [kSpP] the stage's copies landed (one arrival per producer thread + X's bytes)
  uint64_t* consumed;  // [kSpP] the 8 consumer warps are done with the stage
  __device__ __forceinline__ explicit SpShared(uint8_t* s)
      : smem(s), loaded(reinterpret_cast<uint64_t*>(s + kSpP * XInt8Stage::kBytes)), consumed(loaded + kSpP) {}
  __device__ __forceinline__ uint8_t* stage(int i) const { return smem + SpRing(i).p * XInt8Stage::kBytes; }
  __device__ __forceinline__ void init() const {  // thread 0, then a block barrier
    for (int i = 0; i < kSpP; ++i) {
      mbar_init(&loaded[i], 128 + 1);  // the producer threads' cp.async + thread 0's arrive.expect_tx
      mbar_init(&consumed[i], 8);
    }
    mbar_init_fence();
  }
};

// Producer warpgroup: slabs s0 .. s0 + ns - 1 of the block tile at W row n_base and token tile m_tile
// into ring positions ring0 .. ring0 + ns - 1, each once the consumers released the stage's previous
// use. (v7 run 1 issued 34 `cp.async.bulk` copies of 512 B a slab for W from one warp instead of
// cp.async: 4040 clocks per slab against 2012, run 2.)
__device__ __forceinline__ void produce_slabs(const WgmmaParams& p, const SpShared& sh, int ring0, int s0, int ns,
                                              int64_t n_base, int64_t m_tile) {
  for (int j = 0; j < ns; ++j) {
    const SpRing to(ring0 + j);
    if (ring0 + j >= kSpP) mbar_wait(&sh.consumed[to.p], to.p_phase ^ 1);  // the stage's previous use completed
    uint8_t* stage = sh.stage(ring0 + j);
    if (threadIdx.x == 0) {
      mbar_arrive_expect_tx(&sh.loaded[to.p], kXInt8BlockBytes);
      const uint8_t* x_block = p.x_int8 + x_int8_block_offset(m_tile, p.slabs, s0 + j);
      bulk_load(stage + XInt8Stage::kXBlock, x_block, kXInt8BlockBytes, &sh.loaded[to.p]);
    }
    block_tile_load<128, XInt8Stage>(p, stage, s0 + j, n_base, m_tile * kBM);
    cp_async_mbar_arrive(&sh.loaded[to.p]);
  }
}

// A consumer warp's view of the ring: ring position i's stage, X descriptor and scales, its wait
// and release.
struct SpSlabs {
  const SpShared& sh;
  uint64_t x_desc0;  // the descriptor of stage 0's X codes
  int lane;
  __device__ __forceinline__ SpSlabs(const SpShared& s, int l)
      : sh(s), x_desc0(smem_desc(s.smem + XInt8Stage::kXBlock)), lane(l) {}
  __device__ __forceinline__ uint8_t* stage(int i) const { return sh.stage(i); }
  // Slab i's X block: INT8 codes (at its descriptor), then the tokens' fp32 scales.
  __device__ __forceinline__ uint64_t x_desc(int i) const { return x_desc0 + (SpRing(i).p * XInt8Stage::kBytes >> 4); }
  __device__ __forceinline__ const float* x_scales(int i) const {
    return reinterpret_cast<const float*>(stage(i) + XInt8Stage::kXBlock + kUnpackBytes);
  }
  __device__ __forceinline__ const __half* w_scales(int i) const {
    return reinterpret_cast<const __half*>(stage(i) + XInt8Stage::kWScales);
  }
  __device__ __forceinline__ void wait_loaded(int i) const {  // also makes the copies visible here
    const SpRing at(i);
    mbar_wait(&sh.loaded[at.p], at.p_phase);
  }
  __device__ __forceinline__ void release(int i) const {  // the warp is done with slab i's stage
    __syncwarp();
    if (lane == 0) mbar_arrive(&sh.consumed[SpRing(i).p]);
  }
};

// Consumer warpgroups: acc += the folded sum of slabs s0 .. s0 + ns - 1 of a block tile (ring
// positions r0 .. r0 + ns - 1), each stage released after its fold. Warp cw of 8 holds W rows 16 cw ..
// 16 cw + 15 of the block. Each slab runs as two halves of 64 tokens, one commit group each: the lo
// half of slab i is issued, the hi half of slab i - 1 folded while it runs, the hi half of slab i
// issued, the lo half of slab i folded while that runs. The hi sums alternate between two register
// sets, so a wgmma never writes the registers the fold just before it read (ptxas serializes the
// wgmma then, C7514); 96 registers of int32 sums where v9's whole-tile sets took 128. The sets are
// this call's: dead between spans, so stream-K's epilogue does not keep them.
template <IntToFloat kConv>
__device__ __forceinline__ void consume_span(const SpSlabs& ring, int r0, int s0, int ns, int g4, float (&acc)[64],
                                             int cw, int lane) {
  const int wtile = cw * 2, wrow = cw * 16 + lane / 4;
  int lo[32], hi0[32], hi1[32];
  // Slab i: issue its lo half; fold slab i - 1's hi half (in hi_prev) under it unless i is the first;
  // issue its hi half into hi_cur; fold its lo half under that.
  const auto step = [&](int i, bool first, int (&hi_cur)[32], int (&hi_prev)[32]) {
    const int r = r0 + i;
    ring.wait_loaded(r);
    const bool int4 = s0 + i < g4;
    uint32_t a[4][4];
    widen_a(a, ring.stage(r), int4, wtile, lane);
    const uint64_t x_desc = ring.x_desc(r);
    issue_wgmma(lo, a, x_desc);
    if (!first) {
      wgmma_wait<1>();  // hi(i - 1) is done, lo(i) may run on
      fence_regs(hi_prev);
      wgmma_fold<kConv, 8, 8>(acc, hi_prev, ring.w_scales(r - 1), ring.x_scales(r - 1), s0 + i - 1 < g4, wrow, lane);
      ring.release(r - 1);
    }
    issue_wgmma(hi_cur, a, x_desc + (8 * 128 >> 4));  // tokens 64..127: 8 core matrices on
    wgmma_wait<1>();  // lo(i) is done, hi(i) may run on
    fence_regs(lo);
    wgmma_fold<kConv, 8>(acc, lo, ring.w_scales(r), ring.x_scales(r), int4, wrow, lane);
  };
  // The last slab's hi half, folded in the same branch as its step (folded apart, ptxas lost track
  // of which set it was and serialized the loop's wgmma, C7514).
  const int r_last = r0 + ns - 1;
  const auto last_hi = [&](int (&hi)[32]) {
    wgmma_wait<0>();
    fence_regs(hi);
    wgmma_fold<kConv, 8, 8>(acc, hi, ring.w_scales(r_last), ring.x_scales(r_last), s0 + ns - 1 < g4, wrow, lane);
    ring.release(r_last);
  };
  step(0, true, hi0, hi1);
  int i = 1;
  for (; i + 1 < ns; i += 2) {
    step(i, false, hi1, hi0);
    step(i + 1, false, hi0, hi1);
  }
  if (i < ns) {
    step(i, false, hi1, hi0);
    last_hi(hi1);
  } else {
    last_hi(hi0);
  }
}

// v9's consumer: acc += the folded sum of slabs s0 .. s0 + ns - 1 of its block tile (ring positions 0 ..
// ns - 1), each slab issued, waited for and folded on one whole-tile int32 set: the other warpgroup's
// MMAs run under this one's fold (as main's v9 ran in fact before session 21: its keeper branch made
// ptxas close each slab's group early, so `wait_group 1` waited for the slab just issued). Same
// operations per element as consume_span, so the same bits; v9 1.055x faster on it (H100, session 21:
// median of bench_gemm_w4a4 streamk's 72 rows), with fewer instructions (305 a warp and slab, 321).
template <IntToFloat kConv>
__device__ __forceinline__ void consume_tile(const SpSlabs& ring, int s0, int ns, int g4, float (&acc)[64], int cw,
                                             int lane) {
  const int wtile = cw * 2, wrow = cw * 16 + lane / 4;
  int d[64];
  for (int i = 0; i < ns; ++i) {
    ring.wait_loaded(i);
    const bool int4 = s0 + i < g4;
    uint32_t a[4][4];
    widen_a(a, ring.stage(i), int4, wtile, lane);
    issue_wgmma(d, a, ring.x_desc(i));
    wgmma_wait<0>();
    fence_regs(d);
    wgmma_fold<kConv, 16>(acc, d, ring.w_scales(i), ring.x_scales(i), int4, wrow, lane);
    ring.release(i);
  }
}

constexpr IntToFloat kSpConv = IntToFloat::Cvt;  // run 1: 5% faster than the magic add, same bits

template <typename OutT>
__global__ void __launch_bounds__(kSpThreads, 1) wgmma_specialized_kernel(WgmmaParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const SpShared sh(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rank = int(blockIdx.x);  // the cluster spans x
  const WgmmaTileOfBlock tile = grid_tile();
  const int64_t n_base = int64_t(tile.n_tile) * kBN, m_base = int64_t(tile.m_tile) * kBM;
  const int s0 = rank * p.slabs_per_rank, ns = min(p.slabs, s0 + p.slabs_per_rank) - s0;
  if (threadIdx.x == 0) sh.init();
  __syncthreads();

  float acc[64];
  if (warp < 4) {  // producer
    setmaxnreg_dec<kSpProducerRegs>();
    produce_slabs(p, sh, 0, s0, ns, n_base, tile.m_tile);
    __syncthreads();  // pairs with the consumers' barrier before the epilogue
    write_block_tile<OutT>(p, smem, acc, false, 0, lane, rank, n_base, m_base, -1, 0);
    return;
  }
  setmaxnreg_inc<kSpConsumerRegs>();
  const int cw = warp - 4;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0;
  consume_tile<kSpConv>(SpSlabs(sh, lane), s0, ns, p.g4, acc, cw, lane);
  __syncthreads();  // every copy landed (the consumers waited for each on `loaded`): the stages are free
  write_block_tile<OutT>(p, smem, acc, true, cw * 16 + lane / 4, lane, rank, n_base, m_base, threadIdx.x - 128,
                         kSpThreads - 128);
}

// ---- Stream-K (GemmPath::WgmmaStreamK): the specialised kernel's slabs on a persistent grid -------
//
// gemm_w4a4_plan.h has the scheduling (shares, spans, owners and contributors) and its cost model;
// bench/NOTES-gemm_w4a4.md "Session 15" the protocol and why it cannot deadlock. The producer walks
// the block's share span after span without a pause (produce_slabs, the ring position running on);
// the consumers fold the share's slabs in one loop and, after each span's last slab, per warp and
// without any block barrier, either write the output (a whole tile), or write their 16 rows of the
// fp32 partial and raise their flag (a tile's tail: the block's first span), or wait for the flags of
// the tile's contributors, add their partials in block order and write the output (a tile's head:
// the block's last span).
struct StreamKParams {
  int blocks;
  int iterations;      // tiles x slabs (iterations x blocks < 2^31)
  int m_tiles;         // token tiles: tile t is W tile t / m_tiles, token tile t % m_tiles
  uint32_t* flags;     // [blocks][8 warps], 0 between launches
  float4* partials;    // [blocks][8 warps][16][32 lanes]
};
constexpr int kSkStoreBytes = 64 * 32;  // a consumer warp's output staging: 64 tokens x 16 W rows x 16 bits
constexpr int kSkStoreOffset = kSpSmem;
constexpr int kSkSmem = kSkStoreOffset + kStreamKConsumerWarps * kSkStoreBytes;
static_assert(kSkSmem <= 227 * 1024, "shared memory per block");
static_assert(kSpSmem % 16 == 0, "16-byte aligned staging");

__device__ __forceinline__ uint32_t ld_relaxed_gpu(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }
__device__ __forceinline__ void st_release_gpu(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// One warp's 16 W rows x 128 tokens of the output from its accumulators (rows 16 cw + g, + 8, tokens
// 8j + 2t, + 1), through `buf` (kSkStoreBytes) in two halves of 64 tokens: stmatrix.trans turns each
// 8x8 fragment into 8 token rows of 8 contiguous outputs (16 bytes; the two 16-byte halves of a token
// row swapped on every other group of 4 rows, so that neither the stmatrix nor the reads conflict),
// then 16-byte stores of whole 32-byte sectors. Rounding as write_block_tile's (round to nearest).
template <typename OutT>
__device__ __forceinline__ void store_warp_rows(const WgmmaParams& p, const float (&acc)[64], uint8_t* buf, int cw,
                                                int lane, int64_t n_base, int64_t m_base) {
  const auto chunk = [&](int row, int h) { return buf + row * 32 + ((h ^ (row >> 2 & 1)) << 4); };
  OutT* y = static_cast<OutT*>(p.y);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int jj = 0; jj < 8; jj += 2) {
      const int j = 8 * half + jj;
      const int i = lane / 8;  // the lane gives the address of row lane % 8 of matrix i: (j + i / 2, W rows + 8 (i % 2))
      const uint32_t addr = smem_addr(chunk(8 * (jj + i / 2) + lane % 8, i % 2));
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                   "r"(pack2<OutT>(acc[4 * j + 0], acc[4 * j + 1])), "r"(pack2<OutT>(acc[4 * j + 2], acc[4 * j + 3])),
                   "r"(pack2<OutT>(acc[4 * j + 4], acc[4 * j + 5])), "r"(pack2<OutT>(acc[4 * j + 6], acc[4 * j + 7]))
                   : "memory");
    }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int c = lane + 32 * q, row = c / 2, h = c % 2;
      const int64_t gm = m_base + 64 * half + row, gn = n_base + 16 * cw + 8 * h;
      const uint4 v = *reinterpret_cast<const uint4*>(chunk(row, h));
      if (gm >= p.M) continue;
      if (gn + 8 <= p.N && p.N % 8 == 0) {
        *reinterpret_cast<uint4*>(y + gm * p.N + gn) = v;
      } else {
        const OutT* o = reinterpret_cast<const OutT*>(&v);
        for (int e = 0; e < 8 && gn + e < p.N; ++e) y[gm * p.N + gn + e] = o[e];
      }
    }
    __syncwarp();  // the buffer is read before the next half overwrites it
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kSpThreads, 1) wgmma_stream_k_kernel(WgmmaParams p, StreamKParams k) {
  extern __shared__ __align__(128) uint8_t smem[];
  const SpShared sh(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = int(blockIdx.x);
  const int begin = stream_k_share_begin(b, k.iterations, k.blocks);
  const int end = stream_k_share_begin(b + 1, k.iterations, k.blocks);
  if (threadIdx.x == 0) sh.init();
  __syncthreads();
  // X (and, from an earlier stream-K call, the workspace) is the previous kernels' to finish first.
  // Dependents may launch at once: they can only start once every block of this grid has started
  // (executed this), so they never take the place of a block that an owner waits for.
  grid_dependency_wait();
  grid_dependents_launch();
  const auto tile_origin = [&](int tile, int64_t& n_base, int& m_tile) {
    n_base = int64_t(tile / k.m_tiles) * kBN;
    m_tile = tile % k.m_tiles;
  };

  if (warp < 4) {  // producer: the share's spans back to back
    setmaxnreg_dec<kSpProducerRegs>();
    int ring = 0;
    for (int it = begin; it < end;) {
      const StreamKSpan span = stream_k_span(it, end, p.slabs);
      int64_t n_base;
      int m_tile;
      tile_origin(span.tile, n_base, m_tile);
      produce_slabs(p, sh, ring, span.s0, span.s1 - span.s0, n_base, m_tile);
      ring += span.s1 - span.s0;
      it += span.s1 - span.s0;
    }
    // Leave only once every copy has landed: the consumers released the last stages after waiting for them.
    for (int i = max(0, ring - kSpP); i < ring; ++i) mbar_wait(&sh.consumed[SpRing(i).p], SpRing(i).p_phase);
    return;
  }
  setmaxnreg_inc<kSpConsumerRegs>();
  // Consumers: the share's spans in order (ring positions running on), each folded as v9 folds its
  // slabs (consume_span: same operations in the same order, so a span's sum is v9's for the same
  // slabs), then its epilogue per warp.
  const int cw = warp - 4;
  const SpSlabs ring(sh, lane);
  float acc[64];
  // After a span: partial and flag (a tail), or the contributors' partials added (a head) and the
  // output written.
  const auto span_end = [&](const StreamKSpan& span) {
    if (span.s0 > 0) {  // a tail (the share's first span): the partial to slot b, then the flag
      float4* dst = k.partials + (size_t(b) * kStreamKConsumerWarps + cw) * 16 * 32 + lane;
#pragma unroll
      for (int j = 0; j < 16; ++j) __stcg(dst + 32 * j, make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]));
      __threadfence();
      __syncwarp();
      if (lane == 0) st_release_gpu(&k.flags[b * kStreamKConsumerWarps + cw], 1);
      return;
    }
    if (span.s1 < p.slabs) {  // a head (the share's last span): the contributors' partials in block order
      const int last = stream_k_last_contributor(span.tile, p.slabs, k.iterations, k.blocks);
      // All their flags polled with relaxed loads in flight together, then one acquire fence (the PTX
      // acquire pattern): one L2 round trip for all, not one per contributor (up to ~11 on 70B k/v).
      for (bool all = false; !all;) {
        all = true;
        for (int c = b + 1; c <= last; ++c) all &= ld_relaxed_gpu(&k.flags[c * kStreamKConsumerWarps + cw]) != 0;
      }
      fence_acq_rel_gpu();
      // Then the partials (__ldcg: never a stale L1 line of an earlier call's partial at the same
      // address), one at a time.
      for (int c = b + 1; c <= last; ++c) {
        const float4* src = k.partials + (size_t(c) * kStreamKConsumerWarps + cw) * 16 * 32 + lane;
        float4 v[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = __ldcg(src + 32 * j);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[4 * j] += v[j].x, acc[4 * j + 1] += v[j].y, acc[4 * j + 2] += v[j].z, acc[4 * j + 3] += v[j].w;
      }
      // 0 again for the next launch (nothing else reads them in this one), once every lane has seen them
      // set: a lane still polling would otherwise spin on a flag already cleared.
      __syncwarp();
      if (lane == 0)
        for (int c = b + 1; c <= last; ++c) k.flags[c * kStreamKConsumerWarps + cw] = 0;
    }
    int64_t n_base;
    int m_tile;
    tile_origin(span.tile, n_base, m_tile);
    store_warp_rows<OutT>(p, acc, smem + kSkStoreOffset + cw * kSkStoreBytes, cw, lane, n_base, int64_t(m_tile) * kBM);
  };
  int r = 0;
  for (int it = begin; it < end;) {
    const StreamKSpan span = stream_k_span(it, end, p.slabs);
    const int len = span.s1 - span.s0;
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = 0;
    consume_span<kSpConv>(ring, r, span.s0, len, p.g4, acc, cw, lane);
    span_end(span);
    r += len;
    it += len;
  }
}

// The wgmma kernels: same grid (cluster ranks x N tiles x M tiles) and split plan.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}
// x_int8 null: the lockstep kernel on the packed X; else the specialised kernel on X pre-widened there.
template <typename OutT>
void launch_wgmma(const GemmOperands& ops, const uint8_t* x_int8, cudaStream_t stream) {
  const auto lockstep = wgmma_kernel<OutT>;
  const auto specialized = wgmma_specialized_kernel<OutT>;
  static bool configured = [&] {
    set_smem(lockstep, kWgSmem);
    set_smem(specialized, kSpSmem);
    return true;
  }();
  (void)configured;
  const int64_t n_tiles = (ops.w_rows_pad + kBN - 1) / kBN, m_tiles = (ops.x_rows_pad + kBM - 1) / kBM;
  require(n_tiles * m_tiles <= INT32_MAX && m_tiles <= 65535, "gemm_w4a4",
          "{} x {} block tiles: the wgmma grid numbers its blocks in 32 bits, at most 65535 token tiles", n_tiles,
          m_tiles);
  const WgmmaClusterPlan d = wgmma_cluster_plan(wgmma_tiles(ops.w_rows_pad, ops.x_rows_pad), ops.slabs, sm_count());
  WgmmaParams p{ops};
  p.cluster = d.cluster;
  p.slabs_per_rank = d.slabs_per_rank;
  p.x_int8 = x_int8;
  const bool is_lockstep = x_int8 == nullptr;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(d.cluster), unsigned(n_tiles), unsigned(m_tiles));
  cfg.blockDim = dim3(is_lockstep ? kWgThreads : kSpThreads);
  cfg.dynamicSmemBytes = is_lockstep ? kWgSmem : kSpSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = unsigned(d.cluster);
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = d.cluster > 1 ? 1 : 0;
  NIBBLE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, is_lockstep ? lockstep : specialized, p));
}

// The stream-K kernel on X pre-widened at x_int8, with its workspace (stream_k_workspace_bytes of the
// plan's blocks, flags zero). Every block must be resident at once (an owner spins on blocks after
// it): one block per SM fits (checked once), and the plan never takes more blocks than SMs.
template <typename OutT>
void launch_wgmma_stream_k(const GemmOperands& ops, const uint8_t* x_int8, const StreamKPlan& plan, void* workspace,
                           cudaStream_t stream) {
  const auto kernel = wgmma_stream_k_kernel<OutT>;
  static bool configured = [&] {
    set_smem(kernel, kSkSmem);
    int per_sm = 0;
    NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kSpThreads, kSkSmem));
    require(per_sm >= 1, "gemm_w4a4", "the stream-K kernel does not fit an SM");
    return true;
  }();
  (void)configured;
  WgmmaParams p{ops};
  p.cluster = 1;
  p.slabs_per_rank = ops.slabs;
  p.x_int8 = x_int8;
  StreamKParams k;
  k.blocks = plan.blocks;
  k.iterations = plan.iterations();
  k.m_tiles = int((ops.x_rows_pad + kBM - 1) / kBM);
  k.flags = static_cast<uint32_t*>(workspace);
  k.partials = reinterpret_cast<float4*>(static_cast<uint8_t*>(workspace) + stream_k_flags_bytes(plan.blocks));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(plan.blocks));
  cfg.blockDim = dim3(kSpThreads);
  cfg.dynamicSmemBytes = kSkSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  NIBBLE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p, k));
}

// ---- X pre-widened to INT8 in the wgmma B layout (the specialised kernel's input) ------------------
//
// One block per (slab, 128-token tile): its 4 warps widen 4 8-token tiles each with the lockstep
// kernel's store_int8_b, into the global block instead of shared memory, and write the tokens' scales in fp32.
// Tokens >= M get code 0 and scale 0; a keeper slab's unused upper half (k-steps 2, 3) is zeroed, so
// every byte of the buffer is defined.
struct XInt8Params {
  const uint8_t* xq;
  const __half* xs;
  int64_t M, x_rows_pad;
  int slabs, g4;
  uint8_t* out;
};
__global__ void __launch_bounds__(128) x_to_int8_b_layout_kernel(XInt8Params p) {
  constexpr int kTiles = (kBM / kRowTile) / 4;  // 8-token tiles per warp
  const int s = int(blockIdx.x);
  const int64_t m_base = int64_t(blockIdx.y) * kBM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 4, t = lane % 4;
  const bool int4 = s < p.g4;
  uint8_t* block = p.out + x_int8_block_offset(blockIdx.y, p.slabs, s);
  uint4 v[kTiles];
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {  // all loads first
    const int64_t token = m_base + (kTiles * warp + i) * kRowTile + r;
    v[i] = token < p.M ? __ldg(reinterpret_cast<const uint4*>(p.xq + ((token / kRowTile) * p.slabs + s) * size_t(kSlabBytes) + lane * 16))
                       : make_uint4(0, 0, 0, 0);
  }
  const int64_t token = m_base + threadIdx.x;
  const float scale = token < p.M ? __half2float(p.xs[size_t(slab_group(s, p.g4)) * p.x_rows_pad + token]) : 0.0f;
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    uint8_t* base = block + (kTiles * warp + i) * 128 + r * 16 + t * 4;
    store_int8_b(v[i], base, int4);
    if (!int4) {
#pragma unroll
      for (int j = 4; j < 8; ++j) *reinterpret_cast<uint32_t*>(base + j * 2048) = 0;
    }
  }
  reinterpret_cast<float*>(block + kUnpackBytes)[threadIdx.x] = scale;
}

}  // namespace

size_t gemm_w4a4_split_k_bytes(int64_t M, int64_t N, int K, int keeper) {
  if (M > kDecodeMaxM) return 0;  // the decode kernel's split-K sums (enough when it is forced at M <= 16 too)
  const AtomShape w = atom_shape(N, K, keeper);
  return decode_workspace(decode_plan(M, w.rows_pad, w.slabs()));
}

namespace {
// The repacked X's bytes: one block per 128-token tile (of the padded rows, as the kernels' grids) and slab.
size_t x_int8_bytes(const AtomShape& x) {
  return size_t((x.rows_pad + kBM - 1) / kBM) * size_t(x.slabs()) * kXInt8BlockBytes;
}
void require_matching(const AtomShape& x, const AtomShape& w, const std::string& where) {
  require(x.K == w.K && x.keeper == w.keeper, where,
          "X is [{}, {}] keeper {}, W is [{}, {}] keeper {}: K and keeper must match", x.rows, x.K, x.keeper, w.rows,
          w.K, w.keeper);
}
}  // namespace

size_t gemm_w4a4_x_int8_bytes(int64_t M, int K, int keeper) { return x_int8_bytes(atom_shape(M, K, keeper)); }

void x_to_int8_b_layout(const AtomOperand& x, uint8_t* out, cudaStream_t stream) {
  if (x.shape.rows == 0) return;
  const XInt8Params p{x.q, x.s, x.shape.rows, x.shape.rows_pad, x.shape.slabs(), x.shape.g4, out};
  const dim3 grid(unsigned(x.shape.slabs()), unsigned((x.shape.rows_pad + kBM - 1) / kBM));
  x_to_int8_b_layout_kernel<<<grid, 128, 0, stream>>>(p);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

namespace {
// A plan simulates every grid size (~100 µs of host time, more than many of the kernels it plans): computed
// once per (tiles, slabs) and kept.
StreamKPlan stream_k_plan_for(int64_t w_rows_pad, int64_t x_rows_pad, int slabs) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int>, StreamKPlan> plans;
  const int64_t tiles = wgmma_tiles(w_rows_pad, x_rows_pad);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto [at, inserted] = plans.try_emplace({tiles, slabs});
  if (inserted) at->second = stream_k_plan(tiles, slabs, sm_count());
  return at->second;
}
// Auto from kWgmmaMinM rows: stream-K where it measured faster (stream_k_measured_win) and the caller gave
// it a workspace large enough, else v9.
GemmPath wgmma_auto_path(const GemmOperands& ops, const GemmW4A4Scratch& scratch) {
  if (!stream_k_measured_win(wgmma_tiles(ops.w_rows_pad, ops.x_rows_pad), ops.slabs, sm_count())) return GemmPath::Wgmma;
  const StreamKPlan plan = stream_k_plan_for(ops.w_rows_pad, ops.x_rows_pad, ops.slabs);
  const bool workspace = scratch.stream_k && reinterpret_cast<uintptr_t>(scratch.stream_k) % 16 == 0 &&
                         scratch.stream_k_bytes >= stream_k_workspace_bytes(plan.blocks);
  return plan.blocks > 0 && workspace ? GemmPath::WgmmaStreamK : GemmPath::Wgmma;
}

// The stream-K plan of a shape, its workspace checked (before anything is launched).
StreamKPlan checked_stream_k_plan(const GemmOperands& ops, const GemmW4A4Scratch& scratch, const std::string& where) {
  const StreamKPlan plan = stream_k_plan_for(ops.w_rows_pad, ops.x_rows_pad, ops.slabs);
  require(plan.blocks > 0, where, "stream-K takes fewer than 2^31 (tile, slab) iterations, not {} tiles x {} slabs",
          wgmma_tiles(ops.w_rows_pad, ops.x_rows_pad), ops.slabs);
  const size_t need = stream_k_workspace_bytes(plan.blocks);
  require(scratch.stream_k && scratch.stream_k_bytes >= need && reinterpret_cast<uintptr_t>(scratch.stream_k) % 16 == 0,
          where, "stream-K workspace of {} bytes, need {} bytes, 16-byte aligned", scratch.stream_k_bytes, need);
  return plan;
}

// The specialised kernels on X pre-widened at x_int8: v9 (Wgmma), or stream-K on `plan`.
void launch_specialized(const GemmOperands& ops, const uint8_t* x_int8, OutType out, GemmPath path,
                        const StreamKPlan& plan, void* stream_k, cudaStream_t stream) {
  if (path != GemmPath::WgmmaStreamK) {
    if (out == OutType::F16) launch_wgmma<__half>(ops, x_int8, stream);
    else launch_wgmma<__nv_bfloat16>(ops, x_int8, stream);
  } else if (out == OutType::F16) {
    launch_wgmma_stream_k<__half>(ops, x_int8, plan, stream_k, stream);
  } else {
    launch_wgmma_stream_k<__nv_bfloat16>(ops, x_int8, plan, stream_k, stream);
  }
}

bool disjoint(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto at = [](const void* q) { return reinterpret_cast<uintptr_t>(q); };
  return !a || !b || a_bytes == 0 || b_bytes == 0 || at(a) + a_bytes <= at(b) || at(b) + b_bytes <= at(a);
}
}  // namespace

size_t gemm_w4a4_stream_k_bytes(int64_t M, int64_t N, int K, int keeper) {
  const AtomShape x = atom_shape(M, K, keeper), w = atom_shape(N, K, keeper);
  if (M == 0 || N == 0) return 0;
  return stream_k_workspace_bytes(stream_k_plan_for(w.rows_pad, x.rows_pad, w.slabs()).blocks);
}
size_t gemm_w4a4_stream_k_bytes_bound() { return stream_k_workspace_bound(sm_count()); }
StreamPlan gemm_w4a4_stream_plan(int64_t N, int K, int keeper) {
  const AtomShape w = atom_shape(N, K, keeper);
  return stream_plan_on_device(w.rows_pad / (2 * kRowTile), w.slabs());
}

void gemm_w4a4(const AtomOperand& x, const AtomOperand& w, void* y, OutType out, const GemmW4A4Scratch& scratch,
               cudaStream_t stream, GemmPath path) {
  const std::string where = "gemm_w4a4";
  require_matching(x.shape, w.shape, where);
  // Checked on every call, whatever the path: a repack written over the split-K counters or the
  // stream-K flags would leave them non-zero for the next call that needs them zero.
  const auto begin = [](const void* q) { return reinterpret_cast<uintptr_t>(q); };
  require(disjoint(scratch.split_k, scratch.split_k_bytes, scratch.x_int8, scratch.x_int8_bytes) &&
              disjoint(scratch.split_k, scratch.split_k_bytes, scratch.stream_k, scratch.stream_k_bytes) &&
              disjoint(scratch.x_int8, scratch.x_int8_bytes, scratch.stream_k, scratch.stream_k_bytes),
          where, "the split-K scratch ({} bytes), the X scratch ({} bytes) and the stream-K scratch ({} bytes) overlap",
          scratch.split_k_bytes, scratch.x_int8_bytes, scratch.stream_k_bytes);
  const int64_t M = x.shape.rows, N = w.shape.rows;
  if (M == 0 || N == 0) return;
  const GemmOperands ops{x.q, x.s, w.q, w.s, M, x.shape.rows_pad, N, w.shape.rows_pad, w.shape.slabs(), w.shape.g4, y};
  if (path == GemmPath::Auto) {
    // M <= 16: gemm_w4a4_auto_streams (measured, its comment); the decode kernel below kWgmmaMinM
    // (gemm_w4a4.h). The warp-specialised wgmma kernel beat the lockstep one on all 21 benched shapes
    // (v7 1.15-1.28x v6; v9 1.16-1.71x v7, its repack's 4-51 µs not counted).
    path = gemm_w4a4_auto_streams(M, w.shape.packed_bytes()) ? GemmPath::Stream
           : gemm_w4a4_takes_x_int8(M)                       ? wgmma_auto_path(ops, scratch)
                                                             : GemmPath::Decode;
  }
  switch (path) {
    case GemmPath::Stream:
      require(M <= kStreamMaxM, where, "the stream path needs M <= {}, got {}", kStreamMaxM, M);
      launch_stream(ops, out, stream);
      return;
    case GemmPath::Decode: {
      require(M <= kDecodeMaxM, where, "the decode path needs M <= {}, got {}", kDecodeMaxM, M);
      const DecodePlan d = decode_plan(M, w.shape.rows_pad, w.shape.slabs());
      const size_t need = decode_workspace(d);
      require(scratch.split_k_bytes >= need && (need == 0 || scratch.split_k), where,
              "split-K scratch of {} bytes, need {}", scratch.split_k_bytes, need);
      DecodeParams p{ops};
      p.splits = d.splits;
      p.slabs_per_split = d.slabs_per_split;
      p.counters = static_cast<int*>(scratch.split_k);
      p.partial = need ? reinterpret_cast<float*>(static_cast<uint8_t*>(scratch.split_k) +
                                                  round_up(int64_t(d.nblocks) * 4, 256))
                       : nullptr;
      if (out == OutType::F16) launch_decode<__half>(p, d, stream);
      else launch_decode<__nv_bfloat16>(p, d, stream);
      return;
    }
    case GemmPath::WgmmaLockstep:
      if (out == OutType::F16) launch_wgmma<__half>(ops, nullptr, stream);
      else launch_wgmma<__nv_bfloat16>(ops, nullptr, stream);
      return;
    case GemmPath::Wgmma:
    case GemmPath::WgmmaStreamK:
    default: {
      const size_t need = x_int8_bytes(x.shape);
      require(scratch.x_int8 && scratch.x_int8_bytes >= need && begin(scratch.x_int8) % 16 == 0, where,
              "X scratch of {} bytes ({}), need {} bytes, 16-byte aligned", scratch.x_int8_bytes,
              scratch.x_int8 ? "aligned to " + std::to_string(begin(scratch.x_int8) & 15) + " mod 16" : "null", need);
      const StreamKPlan plan = path == GemmPath::WgmmaStreamK ? checked_stream_k_plan(ops, scratch, where) : StreamKPlan{};
      x_to_int8_b_layout(x, scratch.x_int8, stream);
      launch_specialized(ops, scratch.x_int8, out, path, plan, scratch.stream_k, stream);
      return;
    }
  }
}

void gemm_w4a4(const XInt8Operand& x, const AtomOperand& w, void* y, OutType out, cudaStream_t stream, GemmPath path,
               const GemmW4A4Scratch& scratch) {
  const std::string where = "gemm_w4a4 (X pre-widened)";
  require_matching(x.shape, w.shape, where);
  require(path == GemmPath::Auto || path == GemmPath::Wgmma || path == GemmPath::WgmmaStreamK, where,
          "X pre-widened runs the specialised wgmma kernels only");
  require(x.blocks && reinterpret_cast<uintptr_t>(x.blocks) % 16 == 0, where, "X blocks must be non-null and 16-byte aligned");
  const int64_t M = x.shape.rows, N = w.shape.rows;
  if (M == 0 || N == 0) return;
  const GemmOperands ops{nullptr, nullptr, w.q, w.s, M, x.shape.rows_pad, N, w.shape.rows_pad, w.shape.slabs(), w.shape.g4, y};
  if (path == GemmPath::Auto) path = wgmma_auto_path(ops, scratch);
  const StreamKPlan plan = path == GemmPath::WgmmaStreamK ? checked_stream_k_plan(ops, scratch, where) : StreamKPlan{};
  launch_specialized(ops, x.blocks, out, path, plan, scratch.stream_k, stream);
}

}  // namespace nibble::cuda
