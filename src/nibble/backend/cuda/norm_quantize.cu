#include "nibble/backend/cuda/norm_quantize.h"

#include <algorithm>
#include <type_traits>

#include "nibble/backend/cuda/cp_async.cuh"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/format_device.cuh"
#include "nibble/backend/cuda/half_pack.cuh"
#include "nibble/backend/cuda/hadamard_device.cuh"
#include "nibble/core/error.h"

namespace nibble::cuda {

namespace {

enum Mode { kNorm, kGather, kSwiglu };

struct ActParams {
  const __half* a;  // h, a or gate
  const __half* u;  // up (swiglu)
  int64_t ld;
  const int32_t* perm;
  const float* norm_w;
  float eps;
  ActQuant q;
  uint8_t* out_q;   // packed layout (out_b null)
  __half* out_s;
  uint8_t* out_b;   // X pre-widened in the wgmma B layout (gemm_w4a4.h), or null
  AtomShape shape;
  // residual_rmsnorm_quantize: the fp32 residual [rows, K] (read instead of a), the fp16 output added
  // to it first (or null), and the per-row arrival counters of the blocks that share a row.
  float* res_h;
  const __half* res_y;
  int* row_counters;
};

constexpr int kMaxSmem = 200 * 1024;
constexpr int kUnit = 8;  // channels per lane and 16-byte load; a group of 128 is 16 lanes
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr float kRcp7 = 1.0f / 7.0f, kRcp127 = 1.0f / 127.0f;  // rounded to nearest (div_by_qmax)

// Max over the 16 lanes of each half warp (a group each). `members`: the lanes calling it: the
// whole warp where it is converged (a constant full mask compiles to bare shuffles), else the
// caller's half (a register mask costs a convergence check per reduction).
__device__ __forceinline__ float half_warp_max(float v, unsigned members) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(members, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ void unpack8(const uint4& r, float (&v)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 f = __half22float2(h[e]);
    v[2 * e] = f.x;
    v[2 * e + 1] = f.y;
  }
}

// The low bytes of four ints, in order, as one word.
__device__ __forceinline__ uint32_t low_bytes(int b0, int b1, int b2, int b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

// Output channels [c0, c0 + 8) of the row, this lane's unit, through the permutation and the
// mode's formula: from the rows a and (swiglu) u staged in shared memory (sa, su) where the
// kernel staged them (the norm, a permutation), else from global memory (ga, gu).
template <int MODE>
__device__ __forceinline__ void unit_values(const ActParams& p, const __half* sa, const __half* su, const __half* ga,
                                            const __half* gu, int c0, float inv, float (&v)[8]) {
  if (p.perm) {
    const int4 p0 = __ldg(reinterpret_cast<const int4*>(p.perm + c0));
    const int4 p1 = __ldg(reinterpret_cast<const int4*>(p.perm + c0 + 4));
    const int src[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __half2float(sa[src[i]]);
    if constexpr (MODE == kSwiglu) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] / (1.0f + expf(-v[i])) * __half2float(su[src[i]]);
    }
  } else if constexpr (MODE == kNorm) {
    unpack8(*reinterpret_cast<const uint4*>(sa + c0), v);
  } else {
    unpack8(__ldg(reinterpret_cast<const uint4*>(ga + c0)), v);
    if constexpr (MODE == kSwiglu) {
      float w[8];
      unpack8(__ldg(reinterpret_cast<const uint4*>(gu + c0)), w);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] / (1.0f + expf(-v[i])) * w[i];
    }
  }
  if constexpr (MODE == kNorm) {
    const float4 w0 = __ldg(reinterpret_cast<const float4*>(p.norm_w + c0));
    const float4 w1 = __ldg(reinterpret_cast<const float4*>(p.norm_w + c0 + 4));
    const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = w[i] * (v[i] * inv);  // as cpu::rms_norm
  }
}

// Eight values' codes with their group's scale (rcp = 1 / scale; lo, hi: the clamp's ends, as
// int_sym_biased_rcp takes them), as two words of low bytes.
__device__ __forceinline__ void encode_unit(float (&v)[8], float scale, float rcp, float lo, float hi, uint32_t& w0,
                                            uint32_t& w1) {
  clamp_infinite_values(scale, v);
  int b[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) b[i] = int_sym_biased_rcp(v[i], scale, rcp, lo, hi);
  w0 = low_bytes(b[0], b[1], b[2], b[3]);
  w1 = low_bytes(b[4], b[5], b[6], b[7]);
}

// The codes of one more keeper group (channels c0 .. c0 + 7 of it) with the keepers' scale, as two
// words of low bytes: its values recomputed (a keeper unit of several groups keeps only its first
// group's values across the reduction).
template <int MODE>
__device__ __forceinline__ void keeper_codes(const ActParams& p, const __half* sa, const __half* su, const __half* ga,
                                             const __half* gu, int c0, float inv, float scale, float rcp, float lo,
                                             float hi, uint32_t& w0, uint32_t& w1) {
  float v[8];
  unit_values<MODE>(p, sa, su, ga, gu, c0, inv, v);
  encode_unit(v, scale, rcp, lo, hi, w0, w1);
}

// Eight channels c0 .. c0 + 7 of the residual row h (+ y): fp32 as residual_rmsnorm adds them.
__device__ __forceinline__ void residual_unit(const float* h, const __half* y, int c0, float (&v)[8]) {
  const float4 h0 = *reinterpret_cast<const float4*>(h + c0), h1 = *reinterpret_cast<const float4*>(h + c0 + 4);
  const float x[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
  float w[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (y) unpack8(__ldg(reinterpret_cast<const uint4*>(y + c0)), w);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = y ? x[e] + w[e] : x[e];
}
__device__ __forceinline__ void store_unit(float* h, const float (&v)[8]) {
  *reinterpret_cast<float4*>(h) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(h + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  return make_uint4(pack_half2(v[0], v[1]), pack_half2(v[2], v[3]), pack_half2(v[4], v[5]), pack_half2(v[6], v[7]));
}
// A row split over several blocks: the one whose ticket (its arrival count, taken by thread 0 once
// the block had read h) is the last writes h + y back from its shared fp32 copy and leaves the
// counter at zero for the next call. Every other block has read h by then, so the writes cannot
// reach their loads (a write-after-read order only: no fence needed); no block waits for another.
__device__ __forceinline__ void residual_write_back(const ActParams& p, int64_t row, int K, int ticket,
                                                    const float* row_f32) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    last = ticket == int(gridDim.y) - 1;
    if (last) p.row_counters[row] = 0;
  }
  __syncthreads();
  if (!last) return;
  for (int c = threadIdx.x; c < K / 4; c += blockDim.x)
    reinterpret_cast<float4*>(p.res_h + row * K)[c] = reinterpret_cast<const float4*>(row_f32)[c];
}

// X pre-widened (gemm_w4a4.h): the block of the row's 128-token tile and slab s, and the row's
// place n in it. Codes go to x_int8_b_offset(n, k), 16 * code for INT4 slabs (the low nibble moved
// up, as the GEMM widens W), the fp16 scale widened to fp32 after the codes.
// Offsets in 32 bits (launch() checks the output's size): the kernel's registers are few, and a
// 64-bit address derived from the row is recomputed at each store where it cannot stay in one.
struct BLayoutRow {
  uint8_t* out;      // p.out_b
  uint32_t tile_at;  // the row's token tile's first block (slab 0)
  int n;
  __device__ BLayoutRow(const ActParams& p, int64_t row)
      : out(p.out_b),
        tile_at(uint32_t(x_int8_block_offset(row / kXInt8TileTokens, p.shape.slabs(), 0))),
        n(int(row % kXInt8TileTokens)) {}
  __device__ __forceinline__ uint8_t* block(int s) const { return out + (tile_at + uint32_t(s) * kXInt8BlockBytes); }
  // Eight codes of channels k .. k + 7 (k a multiple of 8) of slab s, one 8-byte store.
  __device__ __forceinline__ void store8(int s, int k, uint32_t lo, uint32_t hi) const {
    *reinterpret_cast<uint2*>(block(s) + x_int8_b_offset(n, k)) = make_uint2(lo, hi);
  }
  __device__ __forceinline__ void store_scale(int s, __half scale) const {
    reinterpret_cast<float*>(block(s) + kXInt8CodeBytes)[n] = __half2float(scale);
  }
};
__device__ __forceinline__ uint32_t int4_as_int8_b(uint32_t low_bytes_of_codes) {
  return (low_bytes_of_codes << 4) & 0xF0F0F0F0u;
}

// Blocks of one row, each taking a share of its groups: each half warp quantizes whole groups,
// eight channels per lane, with half-warp reductions only; the keeper groups are one unit (they
// share a scale). Where the row is needed whole (the norm's sum of squares, a permutation's
// gather) one block covers it and stages the raw row in shared memory with 16-byte loads first;
// otherwise each lane reads its 16 bytes in place. The grid covers the padded rows of the output's
// layout (rows_pad packed; whole 128-token tiles pre-widened), the padding rows zeroed.
// MAX_REGS: 64 is what the launch bounds (1024, 1) allow; 40 lets 12 blocks of 128 threads share
// an SM instead of 10.
// kPreWidened: write X pre-widened (p.out_b) instead of packed; a template flag so that each
// layout's kernel keeps its own registers (a run-time branch spilled the capped norm kernel).
template <int MODE, int MAX_REGS, bool kPreWidened>
__global__ void __launch_bounds__(1024, 1) __maxnreg__(MAX_REGS) act_quant_kernel(ActParams p) {
  extern __shared__ __align__(16) __half row_smem[];  // a's row, then (swiglu) u's row
  __shared__ __align__(16) float red[32];
  const AtomShape& sh = p.shape;
  const int64_t row = blockIdx.x;
  // Unsigned lane arithmetic: the signed forms cost a sign fix-up per division by a power of two.
  const unsigned tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
  const int slabs = sh.slabs();
  constexpr bool pre_widened = kPreWidened;
  const BLayoutRow b_row(p, row);

  if (row >= sh.rows) {  // padding row: code 0, scale 0 (written by the row's first block)
    if (blockIdx.y != 0) return;
    uint8_t* q_tile = pre_widened ? nullptr : p.out_q + size_t(row / kRowTile) * slabs * kSlabBytes + (row % kRowTile) * 64;
    if constexpr (pre_widened) {
      for (int c = tid; c < slabs * 8; c += blockDim.x)  // the row's 16 bytes in each of the 8 k-cores
        *reinterpret_cast<uint4*>(b_row.block(c / 8) + x_int8_b_offset(b_row.n, (c % 8) * 16)) = make_uint4(0, 0, 0, 0);
      for (int s = tid; s < slabs; s += blockDim.x) b_row.store_scale(s, __float2half_rn(0.f));
    } else {
      for (int c = tid; c < slabs * 4; c += blockDim.x)
        *reinterpret_cast<uint4*>(q_tile + size_t(c / 4) * kSlabBytes + (c % 4) * 16) = make_uint4(0, 0, 0, 0);
      for (int gi = tid; gi < sh.groups(); gi += blockDim.x) p.out_s[size_t(gi) * sh.rows_pad + row] = __float2half_rn(0.f);
    }
    return;
  }

  // 1. Stage the row by cp.async (16 bytes a copy, all of a lane's copies in flight at once and no
  // registers held: the row costs one memory round trip); the norm then sums its squares from the
  // lane's own copies, in the order of one load at a time.
  const int K = sh.K, units = K / kUnit;
  const __half* ga = p.a ? p.a + row * p.ld : nullptr;  // null: the residual's fp32 row instead
  const __half* gu = MODE == kSwiglu ? p.u + row * p.ld : nullptr;
  const __half* sa = row_smem;
  const __half* su = row_smem + K;
  float ss = 0;
  if (MODE == kNorm && p.res_h) {
    // The residual add first (residual_rmsnorm's arithmetic: h + y in fp32, then fp16), the fp16
    // row staged and its squares summed in the same per-lane order as the staged path below. A row
    // with one block writes h + y back here (each lane its own units, read just before); with
    // several, the fp32 row is kept in shared memory after the fp16 one, for the write-back by the
    // last of them (residual_write_back).
    const float* gh = p.res_h + row * K;
    const __half* gy = p.res_y ? p.res_y + row * K : nullptr;
    float* row_f32 = reinterpret_cast<float*>(row_smem + K);
    for (int c = tid; c < units; c += blockDim.x) {
      float v[8];
      residual_unit(gh, gy, c * kUnit, v);
      if (gy) store_unit(gridDim.y == 1 ? p.res_h + row * K + c * kUnit : row_f32 + c * kUnit, v);
      const uint4 r = pack8(v);
      *reinterpret_cast<uint4*>(row_smem + c * kUnit) = r;
      unpack8(r, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
    }
  } else if (MODE == kNorm || p.perm) {
    for (int c = tid; c < units; c += blockDim.x) {
      cp_async16(row_smem + c * kUnit, ga + c * kUnit);
      if constexpr (MODE == kSwiglu) cp_async16(row_smem + K + c * kUnit, gu + c * kUnit);
    }
    cp_async_commit();
    cp_async_wait<0>();
    if constexpr (MODE == kNorm) {
      for (int c = tid; c < units; c += blockDim.x) {
        // The lane's own copy, landed at the wait; one 16-byte load (a plain dereference compiles
        // to four 4-byte ones here), kept after the wait as both are volatile asm.
        uint4 r;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                     : "r"(smem_u32(row_smem + c * kUnit)));
        float v[8];
        unpack8(r, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
      }
    }
  }
  if constexpr (MODE == kNorm) {
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    if (warp == 0 && lane >= nwarps) red[lane] = 0;  // so that the sum can read red[] four at a time
  }
  __syncthreads();
  // A split row's blocks count their arrivals as soon as each has read h (all of its loads returned
  // before the barrier above); thread 0 holds its ticket until the end of the kernel.
  const bool split_residual = MODE == kNorm && p.res_h && p.res_y && gridDim.y > 1;
  const int ticket = split_residual && tid == 0 ? atomicAdd(&p.row_counters[row], 1) : 0;
  float inv = 1.0f;
  if constexpr (MODE == kNorm) {
    // The warps' sums in order, as one at a time (adding the zero padding changes nothing: the sums
    // are >= +0 or NaN); tot / K as a product where K is a power of two: both round tot·2^-k (the
    // product by __fmul_rn, which is never fused with the + eps into an FMA).
    float tot = 0;
    for (unsigned w = 0; w < nwarps; w += 4) {
      const float4 r = *reinterpret_cast<const float4*>(red + w);
      tot += r.x;
      tot += r.y;
      tot += r.z;
      tot += r.w;
    }
    const float ms = (K & (K - 1)) == 0 ? __fmul_rn(tot, __int_as_float((127 - (__ffs(K) - 1)) << 23)) : tot / float(K);
    inv = 1.0f / sqrtf(ms + p.eps);  // as cpu::rms_norm
  }

  // 2. Work units: the INT4 groups, then (if any) all keeper groups as one unit. Half warp h of
  // warp w takes units 2 (w + k·W) + h (W: the warps of the row's blocks), lane l channels
  // 8l .. 8l + 7 of its unit's (first) group. Both halves run every iteration, so the warp stays
  // converged through the shuffles (full-warp masks: no convergence checks). A pair of INT4 groups
  // takes the lean pass; the last pair (the keepers beside a group or each other, or an odd group
  // whose other half redoes it without storing) the general one.
  const unsigned l = lane % 16, h = lane / 16;
  const int k4 = K - sh.keeper;
  const int units_q = sh.g4 + (sh.g8 > 0 ? 1 : 0);
  // Packed (atom_layout.h): the row's bytes of slab 0, then for an INT4 group lane l's word:
  // k-step l / 4, the high nibbles (l % 4 < 2) or the low ones of words t = 2 (l % 2) and t + 1, the
  // high-nibble lane keeping word t and the low one word t + 1 (each sends the other its half).
  uint32_t q_row = uint32_t(row / kRowTile) * uint32_t(slabs) * kSlabBytes + uint32_t(row % kRowTile) * 64;
  uint32_t q_int4 = q_row + (2 * (l % 2) + (l / 2) % 2) * 16 + (l / 4) * 4;
  int pair_step = int(nwarps * gridDim.y);
  // Loop invariants held in registers: opaque to the compiler, which would otherwise recompute them
  // (the row's offsets, ~12 instructions; the step from special registers) in every iteration.
  asm("" : "+r"(q_row), "+r"(q_int4), "+r"(pair_step));
  const uint32_t rows_pad = uint32_t(sh.rows_pad);
  const auto quantize_pair = [&](int pair, auto general) {
    constexpr bool kGeneral = decltype(general)::value;
    const int wu = kGeneral ? min(2 * pair + int(h), units_q - 1) : 2 * pair + int(h);
    const bool store = !kGeneral || 2 * pair + int(h) < units_q;
    const bool keeper = kGeneral && wu >= sh.g4;
    const int c0 = (keeper ? k4 : wu * kGroup) + int(l) * kUnit;
    // The max of |values| (fmaxf skips NaN, so its order does not matter): more keeper groups first
    // (their values computed again for the codes below), before the unit's values hold registers.
    float amax = 0;
    for (int c = 1; keeper && c < sh.g8; ++c) {
      float w[8];
      unit_values<MODE>(p, sa, su, ga, gu, c0 + c * kGroup, inv, w);
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(w[i]));
    }
    float v[8];
    unit_values<MODE>(p, sa, su, ga, gu, c0, inv, v);
    if (p.q.hadamard && !keeper) hadamard_blocked<8>(v, l, kGeneral ? 0xffffu << (lane & 16) : kFullWarp);  // INT4 only
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = half_warp_max(amax, kFullWarp);
    const float qmax = keeper ? 127.0f : 7.0f;
    const float scale = int_sym_scale_device(keeper ? p.q.clip8 : p.q.clip4, amax, qmax, keeper ? kRcp127 : kRcp7);
    const float rcp = rcp_fp16_scale(scale);
    // A zero scale encodes everything as 0 (format.h): the clamp's ends both at code 0.
    const float lo = scale == 0 ? kIntSymBias : kIntSymBias - (qmax + 1), hi = scale == 0 ? kIntSymBias : kIntSymBias + qmax;
    uint32_t lb0, lb1;
    encode_unit(v, scale, rcp, lo, hi, lb0, lb1);
    const __half scale_h = __float2half_rn(scale);
    if constexpr (pre_widened) {
      if (!store) return;
      if (!keeper) {  // lane l: channels 8l .. 8l + 7 of slab wu
        b_row.store8(wu, l * kUnit, int4_as_int8_b(lb0), int4_as_int8_b(lb1));
        if (l == 0) b_row.store_scale(wu, scale_h);
        return;
      }
      // Keeper group c: slab g4 + 2c + l / 8, channels k .. k + 7 of its 64, and k + 64 (unused) zeroed.
      const auto store_keepers = [&](int c, uint32_t w0, uint32_t w1) {
        const int s = sh.g4 + 2 * c + int(l / 8), k = int(l % 8) * kUnit;
        b_row.store8(s, k, w0, w1);
        b_row.store8(s, k + 64, 0, 0);
        if (l % 8 == 0) b_row.store_scale(s, scale_h);
      };
      store_keepers(0, lb0, lb1);
      for (int c = 1; c < sh.g8; ++c) {
        uint32_t w0, w1;
        keeper_codes<MODE>(p, sa, su, ga, gu, c0 + c * kGroup, inv, scale, rcp, lo, hi, w0, w1);
        store_keepers(c, w0, w1);
      }
    } else {
      const bool low = l & 2;
      const int sh4 = low ? 0 : 4;
      const uint32_t n0 = (lb0 & 0x0f0f0f0fu) << sh4, n1 = (lb1 & 0x0f0f0f0fu) << sh4;  // words t, t + 1
      const uint32_t word = (low ? n1 : n0) | __shfl_xor_sync(kFullWarp, low ? n0 : n1, 2);
      if (!store) return;
      if (!keeper) {
        *reinterpret_cast<uint32_t*>(p.out_q + (q_int4 + uint32_t(wu) * kSlabBytes)) = word;
        if (l == 0) p.out_s[uint32_t(row) + uint32_t(wu) * rows_pad] = scale_h;
        return;
      }
      // Keeper group c: lane l holds half l / 8 of it, word j = 2 ((l % 8) / 4) + (l % 4) / 2 of
      // tiles 2 (l % 2) and 2 (l % 2) + 1.
      const uint32_t q_int8 = q_row + (l / 8) * kSlabBytes + (2 * ((l % 8) / 4) + (l % 4) / 2) * 4 + 2 * (l % 2) * 16;
      const auto store_keepers = [&](int c, uint32_t w0, uint32_t w1) {
        uint8_t* at = p.out_q + (q_int8 + uint32_t(sh.g4 + 2 * c) * kSlabBytes);
        *reinterpret_cast<uint32_t*>(at) = w0;
        *reinterpret_cast<uint32_t*>(at + 16) = w1;
        if (l == 0) p.out_s[uint32_t(row) + uint32_t(sh.g4 + c) * rows_pad] = scale_h;
      };
      store_keepers(0, lb0, lb1);
      for (int c = 1; c < sh.g8; ++c) {
        uint32_t w0, w1;
        keeper_codes<MODE>(p, sa, su, ga, gu, c0 + c * kGroup, inv, scale, rcp, lo, hi, w0, w1);
        store_keepers(c, w0, w1);
      }
    }
  };
  for (int pair = int(blockIdx.y * nwarps + warp); 2 * pair < units_q; pair += pair_step) {
    if (2 * pair + 1 < sh.g4) quantize_pair(pair, std::false_type{});
    else quantize_pair(pair, std::true_type{});
  }
  if (split_residual) residual_write_back(p, row, K, ticket, reinterpret_cast<const float*>(row_smem + K));
}

template <int MODE, int MAX_REGS, bool kPreWidened>
void launch_kernel_t(const ActParams& p, dim3 grid, int threads, size_t smem, cudaStream_t stream) {
  static bool configured = [] {
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(act_quant_kernel<MODE, MAX_REGS, kPreWidened>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem));
    return true;
  }();
  (void)configured;
  act_quant_kernel<MODE, MAX_REGS, kPreWidened><<<grid, threads, smem, stream>>>(p);
  NIBBLE_CUDA_CHECK_LAUNCH();
}
template <int MODE, int MAX_REGS>
void launch_kernel(const ActParams& p, dim3 grid, int threads, size_t smem, cudaStream_t stream) {
  if (p.out_b) launch_kernel_t<MODE, MAX_REGS, true>(p, grid, threads, smem, stream);
  else launch_kernel_t<MODE, MAX_REGS, false>(p, grid, threads, smem, stream);
}

template <int MODE>
void launch(const ActParams& p, cudaStream_t stream) {
  const std::string where = "norm_quantize";
  const bool staged = MODE == kNorm || p.perm;
  size_t smem = staged ? size_t(p.shape.K) * 2 * (MODE == kSwiglu ? 2 : 1) : 0;
  require(p.ld % 8 == 0 && p.ld >= p.shape.K, where, "row stride {} must be a multiple of 8 and >= K", p.ld);
  require(!p.out_b || reinterpret_cast<uintptr_t>(p.out_b) % 16 == 0, where, "pre-widened output must be 16-byte aligned");
  // The kernel's output offsets are 32-bit (a 4 GiB operand is some 8 M tokens of 8192 channels).
  const int64_t out_bytes = p.out_b ? int64_t(gemm_w4a4_x_int8_bytes(p.shape.rows, p.shape.K, p.shape.keeper))
                                    : std::max(p.shape.code_bytes(), p.shape.scale_count());
  require(out_bytes <= int64_t(UINT32_MAX), where, "the output ({} bytes) must be below 4 GiB", out_bytes);
  if (p.shape.rows_pad == 0) return;
  const int64_t grid_rows = p.out_b ? round_up(p.shape.rows_pad, kXInt8TileTokens) : p.shape.rows_pad;
  // Staged: a block per row, a warp per 1024 channels, so that each lane stages at most four
  // 16-byte units and quantizes at most four groups. Otherwise blocks of 4 warps, at most four
  // groups per half warp. A few rows (decode) leave most SMs idle: split each row's groups over
  // more blocks (each stages the whole row, from L2) until about two blocks per SM are in flight,
  // keeping at least one group per half warp.
  static const int sms = [] {
    int dev = 0, n = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&dev));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
  }();
  const int nwarps = staged ? std::min(32, (p.shape.K + 1023) / 1024) : 4;
  const int64_t units_q = p.shape.g4 + (p.shape.g8 > 0 ? 1 : 0);
  const int64_t by_units = (units_q + 2 * nwarps - 1) / (2 * nwarps);
  const int64_t least = staged ? 1 : (by_units + 3) / 4;
  const int64_t by_gpu = (2 * int64_t(sms) + grid_rows - 1) / grid_rows;
  const int64_t splits = std::min(by_units, std::max(least, by_gpu));
  const dim3 grid(unsigned(grid_rows), unsigned(std::clamp<int64_t>(splits, 1, 65535)));
  if (p.res_y && grid.y > 1) smem += size_t(p.shape.K) * 4;  // the fp32 row a split residual writes back
  require(smem <= size_t(kMaxSmem), where, "K = {} is too large", p.shape.K);
  // Many blocks per SM (prefill): the occupancy the registers allow is what hides the latency, so
  // cap them (12 blocks of 128 threads an SM instead of 10: 8% faster at M = 4096, measured; swiglu
  // keeps 64: at 40 it spills). Few (decode): occupancy is no limit, keep the uncapped kernel.
  const bool few_blocks = int64_t(grid.x) * grid.y <= 8 * int64_t(sms);
  constexpr int capped = MODE == kSwiglu ? 64 : 40;
  const int threads = 32 * nwarps;
  // (32 registers, 16 blocks an SM, measured the same as 40 in session 15: kept at 40.)
  if (few_blocks) launch_kernel<MODE, 64>(p, grid, threads, smem, stream);
  else launch_kernel<MODE, capped>(p, grid, threads, smem, stream);
}

ActParams make_params(const __half* a, const __half* u, int64_t ld, const int32_t* perm, const float* w, float eps,
                      const ActOutput& out, ActQuant q) {
  ActParams p{};
  p.a = a;
  p.u = u;
  p.ld = ld;
  p.perm = perm;
  p.norm_w = w;
  p.eps = eps;
  p.q = q;
  p.out_q = out.packed.q;
  p.out_s = out.packed.s;
  p.out_b = out.x_int8;
  p.shape = out.packed.shape;
  return p;
}

}  // namespace

void rmsnorm_quantize(const __half* h, int64_t ld_h, const int32_t* perm, const float* norm_w, float eps,
                      const ActOutput& out, ActQuant q, cudaStream_t stream) {
  launch<kNorm>(make_params(h, nullptr, ld_h, perm, norm_w, eps, out, q), stream);
}

void residual_rmsnorm_quantize(float* h, const __half* y, const int32_t* perm, const float* norm_w, float eps,
                               const ActOutput& out, ActQuant q, int* row_counters, cudaStream_t stream) {
  const std::string where = "residual_rmsnorm_quantize";
  require(h && reinterpret_cast<uintptr_t>(h) % 16 == 0 && (!y || reinterpret_cast<uintptr_t>(y) % 16 == 0), where,
          "h must be non-null and h, y 16-byte aligned");
  require(row_counters || out.packed.shape.rows == 0, where, "row counters must be non-null");
  ActParams p = make_params(nullptr, nullptr, out.packed.shape.K, perm, norm_w, eps, out, q);
  p.res_h = h;
  p.res_y = y;
  p.row_counters = row_counters;
  launch<kNorm>(p, stream);
}

void gather_quantize(const __half* a, int64_t ld_a, const int32_t* perm, const ActOutput& out, ActQuant q,
                     cudaStream_t stream) {
  launch<kGather>(make_params(a, nullptr, ld_a, perm, nullptr, 0, out, q), stream);
}

void swiglu_quantize(const __half* gate, const __half* up, int64_t ld, const int32_t* perm,
                     const ActOutput& out, ActQuant q, cudaStream_t stream) {
  launch<kSwiglu>(make_params(gate, up, ld, perm, nullptr, 0, out, q), stream);
}

}  // namespace nibble::cuda
