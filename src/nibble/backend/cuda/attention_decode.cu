// attention_decode: one query token per sequence against its paged KV cache (INT4 or FP16).
//
// Grid (splits, kv_heads, batch), 4 warps per block. A block owns a contiguous range of 16-token
// chunks of one sequence's cache for one KV head (flash-decoding: the sequence is split when the
// batch alone cannot fill the GPU); its warps take every 4th chunk, each streaming its chunks
// through a private cp.async ring in shared memory. All query heads of the KV head ride in the M
// rows of one mma.sync m16n8k16 (GQA: every K/V load serves G <= 16 heads):
//   S (16 heads x 16 keys) = Q · Kᵀ,  O (16 heads x D) += P · V;
// INT4 with G <= 8 computes the transposed products instead (decode_kernel's KT), the 8 heads as
// the MMAs' columns: Sᵀ (16 keys x 8 heads) = K · Qᵀ, Oᵀ (D x 8 heads) += Vᵀ · Pᵀ.
// INT4 codes enter the MMAs raw, as fp16 subnormals: a nibble masked in place in the low byte of
// an fp16 half is the exact value c · 2^-24 (bits 0-3) or c · 2^-20 (bits 4-7), one AND per pair
// of codes (a shift per word for its upper byte), no conversion arithmetic; the powers of two
// come out of the fp32 results exactly. Scales and zeros are per token, so they leave the inner
// products: K: score = scale · (q·c - zero · Σq); V: O = Σ_k (p_k · scale_k) · c_k - Σ_k (p_k ·
// scale_k) · zero_k, the scales folded into P (16 multiplies per chunk instead of D·16) and the
// zero term one more MMA with the zeros as B. Warps combine in shared memory; the splits of a
// (sequence, KV head) are combined (log-sum-exp weights) by whichever of their blocks ends last.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "nibble/backend/cuda/attention_device.h"
#include "nibble/backend/cuda/attention_plan.h"
#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {
namespace {

using namespace attn;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = kDecodeWarps;
// Nibbles 0 and 1 of each half of a word: as fp16 bit patterns, code · 2^-24 and code · 2^-20.
constexpr uint32_t kNib0 = 0x000F000Fu, kNib1 = 0x00F000F0u;
// KT: the running max of a head moves only when a score exceeds it by more than this (log2 units).
constexpr float kMaxLag = 8.0f;

struct DecodeParams {
  const __half* q;
  __half* out;
  int H, G, layer;
  const float2* rope;
  float scale_log2;
  int splits;     // blocks per (sequence, KV head); each sequence's chunks are divided among them
  float* ws_o;    // [batch][H][splits][D]
  float* ws_lse;  // [batch][H][splits]
  // [batch][kv_heads]: split blocks finished (zero between launches). At the start of the workspace
  // (AttentionWorkspace allocates it zeroed), at a fixed place whatever the shape, so no launch reads
  // another's partials as counters (attention_plan.h: the split plan, its limits, the workspace bound).
  uint32_t* arrivals;
};

// A chunk in a ring slot. INT4: the chunk's own layout (K codes [16][D/2], V codes [16][D/2], scales
// and zeros, 96 bytes), its V codes swizzled (v_swizzle), the slot rounded up to whole 128-byte lines
// so that every slot starts on bank 0. FP16: K then V, 32 rows padded to 2D + 16 bytes (ldmatrix
// conflict-free).
template <int D, bool INT4>
constexpr int stage_bytes() {
  return INT4 ? (16 * D + 96 + 127) / 128 * 128 : 2 * 16 * (2 * D + 16);
}
// The slot offset of INT4 V code byte `off` (a slot offset in [8·D, 16·D)): its 16-byte unit XOR
// ((off / 128) mod 4) · 2 within its 128-byte line. The V reads take rows 2t (+ 1, + 8, + 9) of the
// 4 lanes t at once (8 bytes each at D = 128): unswizzled rows of 64 bytes put those 4 rows on the
// same banks (4-way); the swizzle sends line t's unit to bank group unit ^ 2t, distinct for the 4
// lanes t. Each copy pass still writes whole lines (8 lanes, 128 contiguous source bytes) to one
// permuted line: conflict-free. (v10 padded the rows to D/2 + 16 bytes instead: reads conflict-free,
// but a pass's quarter warps wrote 2 rows 80 bytes apart, 2-way on 4 banks.)
__host__ __device__ constexpr int v_swizzle(int off) {
  return off ^ ((off >> 2) & 0x60);
}
template <bool INT4>
constexpr int stages() {
  return INT4 ? 4 : 3;
}
template <int D, bool INT4, bool ROPE_K>
constexpr int warp_smem_bytes() {
  return stages<INT4>() * stage_bytes<D, INT4>() + (ROPE_K ? 16 * (2 * D + 16) : 0);
}
template <int D, bool INT4, bool ROPE_K>
constexpr int decode_smem_bytes() {
  constexpr int pipe = kWarps * warp_smem_bytes<D, INT4, ROPE_K>();
  constexpr int reduce = kWarps * 16 * (D + 2) * 4;
  return pipe > reduce ? pipe : reduce;
}

// 8x8 fp16 tile transposed across the warp (the m8n8 fragment: lane 4r + c holds row r, columns
// 2c and 2c + 1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// The V codes of one INT4 chunk in the pairs both P·V forms feed the MMAs: v01[r][h] holds keys
// 2t (low half) and 2t + 1 (high half) of word g·D/64 + r of their code rows, the half with dims
// h, 2 + h, 4 + h, 6 + h (nibbles 0..3; 0 and 1 in place, 2 and 3 after >> 8); v23 the same for
// keys 2t + 8, 2t + 9. z01 / z23: the V zeros of those keys as fp16 subnormal pairs (z · 2^-24).
template <int D>
struct V_pairs {
  uint32_t v01[D / 64][2], v23[D / 64][2], z01, z23;
};
// Slot offsets of the lane's V code reads: rows 2t + (q & 1) + 8(q >> 1), bytes g·D/16 on (one 8-byte
// load at D = 128, 4 bytes at D = 64), swizzled; loop-invariant, made once per lane. Rows 8 on are 4D
// bytes further: at D = 128 a multiple of the swizzle's 512-byte period, so the reads of q = 2, 3 are
// those of q = 0, 1 plus an immediate (two lane offsets a chunk, not four).
template <int D>
struct V_offsets {
  int q[4];
};
template <int D>
__device__ __forceinline__ V_offsets<D> v_read_offsets(int g, int t) {
  V_offsets<D> vo;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    vo.q[q] = 4 * D % 512 == 0 && q >= 2
                  ? vo.q[q - 2] + 4 * D
                  : v_swizzle(8 * D + (2 * t + (q & 1) + 8 * (q >> 1)) * (D / 2) + g * (D / 16));
  return vo;
}
template <int D>
__device__ __forceinline__ V_pairs<D> v_code_pairs(const uint8_t* st, const uint8_t* prm, const V_offsets<D>& vo, int t) {
  V_pairs<D> vp;
  vp.z01 = __byte_perm(*reinterpret_cast<const uint16_t*>(prm + 80 + 2 * t), 0u, 0x4140);
  vp.z23 = __byte_perm(*reinterpret_cast<const uint16_t*>(prm + 80 + 2 * t + 8), 0u, 0x4140);
  // Words g·D/64 + r of the code rows of keys 2t, 2t+1, 2t+8, 2t+9.
  uint32_t xw[4][D / 64];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint8_t* row = st + vo.q[q];
    if constexpr (D == 128) {
      const uint2 v = *reinterpret_cast<const uint2*>(row);
      xw[q][0] = v.x, xw[q][1] = v.y;
    } else {
      xw[q][0] = *reinterpret_cast<const uint32_t*>(row);
    }
  }
#pragma unroll
  for (int r = 0; r < D / 64; ++r) {
    vp.v01[r][0] = __byte_perm(xw[0][r], xw[1][r], 0x5410);
    vp.v01[r][1] = __byte_perm(xw[0][r], xw[1][r], 0x7632);
    vp.v23[r][0] = __byte_perm(xw[2][r], xw[3][r], 0x5410);
    vp.v23[r][1] = __byte_perm(xw[2][r], xw[3][r], 0x7632);
  }
  return vp;
}

// INT4: at most 168 registers, 3 blocks (12 warps) per SM (v2-v6 capped it at 128 for 4 blocks;
// the zero-term accumulator of the raw-code V products no longer fits there without spilling);
// KT fits 102 registers without spilling (96 at D = 128): 5 blocks (20 warps) per SM (ncu of v7:
// latency-bound at 12 warps per SM). Its 34 KB of shared memory a block would allow 6, but 80
// registers spill (56 bytes at D = 128).
// KT (INT4 K after RoPE, G <= 8): Sᵀ = K · Qᵀ, the 16 keys as the MMA's rows and the G query
// heads as its 8 columns, so that 8 MMAs (not 16) make a chunk's scores and a lane holds 4 of them
// (keys g, g + 8 of heads 2t, 2t + 1) instead of 8; two movmatrix transposes make Pᵀ (keys x heads)
// the B fragment of Oᵀ += Vᵀ · Pᵀ, whose A fragments are the V code pairs the S form feeds as B:
// D/16 MMAs per chunk instead of D/8 (whose rows g + 8 were empty for G <= 8), the accumulators
// halved, and each output column is a head of the lane's own softmax state.
template <int D, bool INT4, bool ROPE_K, bool KT = false>
__global__ void __launch_bounds__(128, KT ? 5 : INT4 && !ROPE_K ? 3 : 1) decode_kernel(KVCacheView c, AttentionBatch b, DecodeParams p) {
  static_assert(!KT || (INT4 && !ROPE_K));
  static_assert(16 * kDecodeMaxSplits * sizeof(float) <= decode_smem_bytes<D, INT4, ROPE_K>());
  constexpr int SB = stage_bytes<D, INT4>();
  constexpr int NS = stages<INT4>();
  constexpr int KR = 2 * D + 16;  // fp16 row stride in bytes (padded: ldmatrix conflict-free)
  constexpr bool K_NIBBLE = INT4 && !ROPE_K;  // K straight from codes (else an fp16 K tile)
  extern __shared__ __align__(16) uint8_t smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
  const int len = b.seq_lens[seq];
  const int n_chunks = (len + 15) / 16;
  // Each sequence splits its own length, so the grid depends on the batch size alone (a captured
  // step replays at any length); a split past a short sequence's end only writes an empty partial.
  const int per_split = (n_chunks + p.splits - 1) / p.splits;
  const int c_begin = split * per_split;
  const int c_end = min(n_chunks, c_begin + per_split);
  const int my_n = c_begin + warp < c_end ? (c_end - c_begin - warp + kWarps - 1) / kWarps : 0;
  const int32_t* table = b.block_tables + int64_t(seq) * b.max_blocks;
  uint8_t* ring = smem + warp * warp_smem_bytes<D, INT4, ROPE_K>();
  uint8_t* krot = ring + NS * SB;  // ROPE_K: the rotated fp16 K tile
  // Block (layer, page, kvh) = kv_base + page * page_stride (kv_cache_paged.h pool layout).
  const uint8_t* kv_base = block_ptr(c, p.layer, 0, kvh);
  const int64_t page_stride = int64_t(c.kv_heads) * c.block_bytes;

  // The page holding chunk i of this warp: read from the block table one iteration before its
  // copy is issued (a table read per chunk stalled the issue by an L2/DRAM round trip).
  auto page_of = [&](int i) { return i < my_n ? table[((c_begin + warp + i * kWarps) * 16) >> c.page_shift] : 0; };
  // INT4: pass `it` of a chunk copy moves the lane's 16-byte unit lane + 32·it from lane·16 + 512·it
  // into the chunk to the same slot offset, swizzled in the V codes (v_swizzle of a multiple of 512
  // plus lane·16 is that multiple plus v_swizzle(lane·16)): loop-invariant per lane, so each copy is
  // one cp.async on a base plus an immediate (v6 recomputed ~40 instructions of offsets per chunk).
  constexpr int RU4 = D / 32;  // INT4: 16-byte units per row of codes
  const int lane16 = lane * 16;
  const int v_lane = v_swizzle(lane16);
  [[maybe_unused]] const V_offsets<D> v_off = v_read_offsets<D>(g, t);
  // Chunk i of this warp (16 keys, contiguous in page `page`) into ring slot i % NS.
  auto issue = [&](int i, int page) {
    if (i >= my_n) return;
    const int key0 = (c_begin + warp + i * kWarps) * 16;
    constexpr int64_t CB = kv_chunk_bytes(D, INT4 ? KVDtype::Int4 : KVDtype::Fp16);  // a chunk in global memory
    const uint8_t* src = kv_base + page * page_stride + ((key0 & (c.page_size - 1)) >> 4) * CB;
    uint8_t* dst = ring + (i % NS) * SB;
    if constexpr (INT4) {
      constexpr int NU = int(CB / 16);
      // K codes and V codes are 16 RU4 units each, a multiple of 32: every pass of the warp lies in
      // one region, known at compile time.
      static_assert(16 * RU4 % 32 == 0);
      src += lane16;
#pragma unroll
      for (int it = 0; it < (NU + 31) / 32; ++it) {
        const bool v_codes = 32 * it >= 16 * RU4 && 32 * (it + 1) <= 32 * RU4;
        if (32 * (it + 1) <= NU || lane < NU - 32 * it)  // (the last pass: scales and zeros, 6 lanes)
          cp_async16(dst + (v_codes ? v_lane : lane16) + 512 * it, src + 512 * it);
      }
    } else {
      constexpr int RU = D / 8;  // 16-byte units per fp16 row; rows 0..15 K, 16..31 V
#pragma unroll 4
      for (int u = lane; u < 32 * RU; u += 32) {
        const int row = u / RU, cc = u % RU;
        const bool ok = key0 + (row & 15) < len;  // rows past the end: zeros (V must stay finite)
        cp_async16(dst + row * KR + cc * 16, ok ? src + u * 16 : src, ok ? 16 : 0);
      }
    }
  };

  // The ring's first chunks go in flight before the Q loads, so that the two round trips overlap
  // (issued after the Q fragments, the first copies waited for them).
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    issue(i, page_of(i));
    cp_async_commit();
  }
  int next_page = page_of(NS - 1);

  // Q fragments (rows = the G heads of this KV head, zero beyond G; KT: a[0], a[2] are the B
  // fragments of Qᵀ) and, for the INT4 K path, Σq of the lane's two score rows (heads g, g + 8;
  // KT: its two score columns, heads 2t, 2t + 1).
  const __half* qh = p.q + (int64_t(seq) * p.H + int64_t(kvh) * p.G) * D;
  uint32_t qf[D / 16][4];
  float sumq0 = 0, sumq1 = 0;
  {
    const bool v_g = g < p.G, v_g8 = g + 8 < p.G;
    if constexpr (K_NIBBLE) {
      // k-step 2a + b: nibbles b (dims 2b, 2b+1) and b + 2 of word a of the lane's D/4 dims
      // (t · D/4 on): its a[0] / a[2] pairs are words 4a + b and 4a + b + 2 of those, so a row's
      // pairs come in D/32 16-byte loads. (One 4-byte load per pair touched 32 lines a warp and
      // instruction at G = 8: 512 L1 passes a warp before the first chunk.)
      const uint4* rg = reinterpret_cast<const uint4*>(qh + g * D + t * (D / 4));
      const uint4* rg8 = reinterpret_cast<const uint4*>(qh + (g + 8) * D + t * (D / 4));
#pragma unroll
      for (int a = 0; a < D / 32; ++a) {
        const uint4 x = v_g ? rg[a] : make_uint4(0, 0, 0, 0), y = v_g8 ? rg8[a] : make_uint4(0, 0, 0, 0);
        qf[2 * a][0] = x.x, qf[2 * a + 1][0] = x.y, qf[2 * a][2] = x.z, qf[2 * a + 1][2] = x.w;
        qf[2 * a][1] = y.x, qf[2 * a + 1][1] = y.y, qf[2 * a][3] = y.z, qf[2 * a + 1][3] = y.w;
      }
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      if constexpr (!K_NIBBLE) {
        const int d0 = ks * 16 + 2 * t, d1 = d0 + 8;  // dims of the a[0] / a[2] pairs
        const uint32_t* q32g = reinterpret_cast<const uint32_t*>(qh + g * D);
        const uint32_t* q32g8 = reinterpret_cast<const uint32_t*>(qh + (g + 8) * D);
        qf[ks][0] = v_g ? q32g[d0 / 2] : 0u;
        qf[ks][1] = v_g8 ? q32g8[d0 / 2] : 0u;
        qf[ks][2] = v_g ? q32g[d1 / 2] : 0u;
        qf[ks][3] = v_g8 ? q32g8[d1 / 2] : 0u;
      } else {
        // Odd k-steps meet nibbles 1 and 3, which the MMA reads as c · 2^-20: q / 16 there keeps
        // every product in units of 2^-24. Exact unless q / 16 falls below fp16's normal range
        // (|q| < 2^-10), where it rounds to a multiple of 2^-24 (error <= 2^-25 on a tiny term).
        // Σq sums the q the MMA sees.
        if (ks % 2) {
          const __half2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
          for (int e = 0; e < 4; ++e) qf[ks][e] = h2u(__hmul2(u2h(qf[ks][e]), sixteenth));
        }
        const float f = ks % 2 ? 16.0f : 1.0f;
        const float2 a = __half22float2(u2h(qf[ks][0])), a2 = __half22float2(u2h(qf[ks][2]));
        const float2 c8 = __half22float2(u2h(qf[ks][1])), c82 = __half22float2(u2h(qf[ks][3]));
        sumq0 += f * ((a.x + a.y) + (a2.x + a2.y));
        sumq1 += f * ((c8.x + c8.y) + (c82.x + c82.y));
      }
    }
    if constexpr (K_NIBBLE) {
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        sumq0 += __shfl_xor_sync(0xffffffffu, sumq0, off);
        sumq1 += __shfl_xor_sync(0xffffffffu, sumq1, off);
      }
      sumq0 *= 0x1p-24f;  // in the units of the raw-code scores
      sumq1 *= 0x1p-24f;
      if constexpr (KT) {
        const float q2t = __shfl_sync(0xffffffffu, sumq0, 8 * t), q2t1 = __shfl_sync(0xffffffffu, sumq0, 8 * t + 4);
        sumq0 = q2t;
        sumq1 = q2t1;
      }
    }
  }

  // O in m16n8 tiles (KT: Oᵀ, rows dims and columns heads 2t, 2t + 1: half the tiles, no empty
  // rows); INT4: o[NO - 1] accumulates Σ_k p_k · scale_k · zero_k (rescaled with the rest).
  constexpr int NO = (KT ? D / 16 : D / 8) + (INT4 ? 1 : 0);
  float o[NO][4];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0;
  // Softmax state of the lane's two score rows (KT: columns): running max (log2 domain) and sum.
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
  const float score_scale = p.scale_log2 * (K_NIBBLE ? 0x1p24f : 1.0f);  // raw-code scores: units of 2^-24

  for (int i = 0; i < my_n; ++i) {
    issue(i + NS - 1, next_page);
    next_page = page_of(i + NS);
    cp_async_commit();
    cp_async_wait<NS - 1>();
    __syncwarp();
    const uint8_t* st = ring + (i % NS) * SB;
    const uint8_t* prm = st + 16 * D;  // INT4: K scales, V scales, K zeros, V zeros
    const int key0 = (c_begin + warp + i * kWarps) * 16;
    const int nvalid = min(16, len - key0);

    // K tile in fp16 (rotated) for the ROPE_K path.
    if constexpr (ROPE_K) {
      const int r = lane / 2, hf = lane % 2;
      const int pos = key0 + r;
      const bool ok = r < nvalid;
      constexpr int WH = D / 16;  // 8-dim words in the first half
#pragma unroll
      for (int w = hf * (WH / 2); w < (hf + 1) * (WH / 2); ++w) {
        float lo[8], hi[8];
        if constexpr (INT4) {
          const uint32_t wl = reinterpret_cast<const uint32_t*>(st + r * (D / 2))[w];
          const uint32_t wh = reinterpret_cast<const uint32_t*>(st + r * (D / 2))[w + WH];
          const float s = __half2float(reinterpret_cast<const __half*>(prm)[r]);
          const int z = prm[64 + r];
#pragma unroll
          for (int n = 0; n < 8; ++n) {
            const int dim = n < 4 ? 2 * n : 2 * (n - 4) + 1;
            // format.h int_asym_decode: (code - zero) · scale in fp32
            lo[dim] = float(int((wl >> (4 * n)) & 15u) - z) * s;
            hi[dim] = float(int((wh >> (4 * n)) & 15u) - z) * s;
          }
        } else {
          const uint4 vl = *reinterpret_cast<const uint4*>(st + r * KR + w * 16);
          const uint4 vh = *reinterpret_cast<const uint4*>(st + r * KR + (w + WH) * 16);
          const uint32_t ul[4] = {vl.x, vl.y, vl.z, vl.w}, uh[4] = {vh.x, vh.y, vh.z, vh.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 fl = __half22float2(u2h(ul[k])), fh = __half22float2(u2h(uh[k]));
            lo[2 * k] = fl.x;
            lo[2 * k + 1] = fl.y;
            hi[2 * k] = fh.x;
            hi[2 * k + 1] = fh.y;
          }
        }
        uint32_t ol[4] = {0, 0, 0, 0}, oh[4] = {0, 0, 0, 0};
        if (ok) {
          const float2* cs = p.rope + int64_t(pos) * (D / 2) + w * 8;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 c0 = cs[2 * k], c1 = cs[2 * k + 1];
            ol[k] = pack_half2(lo[2 * k] * c0.x - hi[2 * k] * c0.y, lo[2 * k + 1] * c1.x - hi[2 * k + 1] * c1.y);
            oh[k] = pack_half2(hi[2 * k] * c0.x + lo[2 * k] * c0.y, hi[2 * k + 1] * c1.x + lo[2 * k + 1] * c1.y);
          }
        }
        *reinterpret_cast<uint4*>(krot + r * KR + w * 16) = make_uint4(ol[0], ol[1], ol[2], ol[3]);
        *reinterpret_cast<uint4*>(krot + r * KR + (w + WH) * 16) = make_uint4(oh[0], oh[1], oh[2], oh[3]);
      }
      __syncwarp();
    }

    // S form: P · diag(V scales) as the fp16 A fragments of the P·V product (rows = heads g, g + 8;
    // k = keys 2t, 2t + 1 in a[0], a[1] and 2t + 8, 2t + 9 in a[2], a[3]).
    [[maybe_unused]] uint32_t pa[4];
    if constexpr (KT) {
      // ---- Sᵀ = K · Qᵀ: rows keys g, g + 8; columns heads 2t, 2t + 1 ----
      uint32_t w[2][D / 32];  // keys g, g + 8: the same words as the B fragments of the S path
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint8_t* krow = st + (8 * j + g) * (D / 2) + t * (D / 8);
        if constexpr (D == 128) {
          const uint4 v = *reinterpret_cast<const uint4*>(krow);
          w[j][0] = v.x, w[j][1] = v.y, w[j][2] = v.z, w[j][3] = v.w;
        } else {
          const uint2 v = *reinterpret_cast<const uint2*>(krow);
          w[j][0] = v.x, w[j][1] = v.y;
        }
      }
      float sa[4] = {0, 0, 0, 0}, sb[4] = {0, 0, 0, 0};  // nibbles 0/2 and 1/3: two MMA chains
#pragma unroll
      for (int r = 0; r < D / 32; ++r) {
        const uint32_t g8 = w[0][r] >> 8, h8 = w[1][r] >> 8;
        const uint32_t ka[4] = {w[0][r] & kNib0, w[1][r] & kNib0, g8 & kNib0, h8 & kNib0};
        const uint32_t kb[4] = {w[0][r] & kNib1, w[1][r] & kNib1, g8 & kNib1, h8 & kNib1};
        mma16816(sa, ka, qf[2 * r][0], qf[2 * r][2]);
        mma16816(sb, kb, qf[2 * r + 1][0], qf[2 * r + 1][2]);
      }
      // Scores in the log2 domain: element e is key g + 8 (e / 2) of head 2t + e % 2.
      const __half* ksc = reinterpret_cast<const __half*>(prm);
      const float sck[2] = {score_scale * __half2float(ksc[g]), score_scale * __half2float(ksc[g + 8])};
      const float zk[2] = {float(prm[64 + g]), float(prm[64 + g + 8])};
      const bool ok[2] = {g < nvalid, g + 8 < nvalid};
      float sc[4];
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sc[e] = ok[e / 2] ? (sa[e] + sb[e] - zk[e / 2] * (e % 2 ? sumq1 : sumq0)) * sck[e / 2] : -INFINITY;
      // Online softmax per head (the lane's columns, heads 2t and 2t + 1) with a lazy running
      // max: it moves (maxima over the 16 keys = the lanes of the same t, the accumulators
      // rescaled) only when a score passes it by more than kMaxLag, so most chunks skip the
      // shuffles and the rescale; the weights stay <= 2^kMaxLag, exact in fp32 and fp16 alike.
      const float mx0 = fmaxf(sc[0], sc[2]), mx1 = fmaxf(sc[1], sc[3]);
      if (__any_sync(0xffffffffu, mx0 > m0 + kMaxLag || mx1 > m1 + kMaxLag)) {
        const float2 al = softmax_new_max<4, 16>(mx0, mx1, m0, m1);
        l0 *= al.x;
        l1 *= al.y;
#pragma unroll
        for (int n = 0; n < NO; ++n) {  // Oᵀ columns are the lane's heads
          o[n][0] *= al.x;
          o[n][1] *= al.y;
          o[n][2] *= al.x;
          o[n][3] *= al.y;
        }
      }
      sc[0] = fast_exp2(sc[0] - m0);
      sc[1] = fast_exp2(sc[1] - m1);
      sc[2] = fast_exp2(sc[2] - m0);
      sc[3] = fast_exp2(sc[3] - m1);
      l0 += sc[0] + sc[2];  // this lane's keys only: summed over the lanes at the end
      l1 += sc[1] + sc[3];
      // Pᵀ · diag(V scales) (scale 0 past the end keeps the slot's stale scales out) as the B
      // fragment of the Oᵀ product: the movmatrix transposes give lane (g, t) head g, keys 2t,
      // 2t + 1 (b0) and 2t + 8, 2t + 9 (b1).
      const __half* vsc = reinterpret_cast<const __half*>(prm + 32);
      const float sv0 = ok[0] ? __half2float(vsc[g]) : 0.f, sv1 = ok[1] ? __half2float(vsc[g + 8]) : 0.f;
      const uint32_t pt0 = transpose8x8(pack_half2(sc[0] * sv0, sc[1] * sv0));
      const uint32_t pt1 = transpose8x8(pack_half2(sc[2] * sv1, sc[3] * sv1));
      // ---- Oᵀ (16 dims x 8 heads) += Vᵀ · Pᵀ: D/16 MMAs a chunk, not D/8 ----
      // The zero term: every row of A is the zeros of keys (2t, 2t+1 | 2t+8, 2t+9).
      const V_pairs vp = v_code_pairs<D>(st, prm, v_off, t);
      const uint32_t zf[4] = {vp.z01, vp.z01, vp.z23, vp.z23};
      mma16816(o[NO - 1], zf, pt0, pt1);
#pragma unroll
      for (int r = 0; r < D / 64; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Rows g: dims h (+ 4) of word g·D/64 + r, c · 2^-24; rows g + 8: dims 2 + h (+ 4), c · 2^-20.
          const uint32_t v01s = vp.v01[r][h] >> 8, v23s = vp.v23[r][h] >> 8;
          const uint32_t lo[4] = {vp.v01[r][h] & kNib0, vp.v01[r][h] & kNib1, vp.v23[r][h] & kNib0, vp.v23[r][h] & kNib1};
          const uint32_t hi[4] = {v01s & kNib0, v01s & kNib1, v23s & kNib0, v23s & kNib1};
          mma16816(o[4 * r + 2 * h], lo, pt0, pt1);
          mma16816(o[4 * r + 2 * h + 1], hi, pt0, pt1);
        }
    } else {
      // ---- S = Q · Kᵀ ----
      float s[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0;
        if constexpr (K_NIBBLE) {
          uint32_t w[D / 32];
          const uint8_t* krow = st + (8 * j + g) * (D / 2) + t * (D / 8);
          if constexpr (D == 128) {
            const uint4 v = *reinterpret_cast<const uint4*>(krow);
            w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
          } else {
            const uint2 v = *reinterpret_cast<const uint2*>(krow);
            w[0] = v.x, w[1] = v.y;
          }
          // Nibbles 0 and 2 of each half (c · 2^-24) against q, 1 and 3 (c · 2^-20) against q / 16:
          // s = Σ q·c in units of 2^-24.
#pragma unroll
          for (int r = 0; r < D / 32; ++r) {
            const uint32_t w8 = w[r] >> 8;
            mma16816(s[j], qf[2 * r], w[r] & kNib0, w8 & kNib0);
            mma16816(s[j], qf[2 * r + 1], w[r] & kNib1, w8 & kNib1);
          }
        } else {
          const uint8_t* kt = ROPE_K ? krot : st;
#pragma unroll
          for (int ks = 0; ks < D / 16; ks += 2) {
            uint32_t r[4];
            ldmatrix_x4(r, kt + (8 * j + (lane % 8)) * KR + (ks * 16 + (lane / 8) * 8) * 2);
            mma16816(s[j], qf[ks], r[0], r[1]);
            mma16816(s[j], qf[ks + 1], r[2], r[3]);
          }
        }
      }
      // Scores in the log2 domain, masked past the end.
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int k0 = 8 * j + 2 * t;  // this thread's keys k0, k0 + 1
        float sc0 = score_scale, sc1 = score_scale, zq0 = 0, zq1 = 0, zq80 = 0, zq81 = 0;
        if constexpr (K_NIBBLE) {
          const float2 ksc = __half22float2(*reinterpret_cast<const __half2*>(prm + 2 * k0));
          const uint16_t kz = *reinterpret_cast<const uint16_t*>(prm + 64 + k0);
          sc0 *= ksc.x;
          sc1 *= ksc.y;
          zq0 = float(kz & 0xff) * sumq0;
          zq1 = float(kz >> 8) * sumq0;
          zq80 = float(kz & 0xff) * sumq1;
          zq81 = float(kz >> 8) * sumq1;
        }
        s[j][0] = k0 < nvalid ? (s[j][0] - zq0) * sc0 : -INFINITY;
        s[j][1] = k0 + 1 < nvalid ? (s[j][1] - zq1) * sc1 : -INFINITY;
        s[j][2] = k0 < nvalid ? (s[j][2] - zq80) * sc0 : -INFINITY;
        s[j][3] = k0 + 1 < nvalid ? (s[j][3] - zq81) * sc1 : -INFINITY;
        mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
      }
      online_softmax_step(s, o, mx0, mx1, m0, m1, l0, l1);
      if constexpr (INT4) {
        // Scale 0 past the end keeps garbage (the slot's stale scales) out.
        float2 sv01 = __half22float2(*reinterpret_cast<const __half2*>(prm + 32 + 4 * t));
        float2 sv23 = __half22float2(*reinterpret_cast<const __half2*>(prm + 32 + 4 * t + 16));
        if (nvalid < 16) {
          sv01 = make_float2(2 * t < nvalid ? sv01.x : 0.f, 2 * t + 1 < nvalid ? sv01.y : 0.f);
          sv23 = make_float2(2 * t + 8 < nvalid ? sv23.x : 0.f, 2 * t + 9 < nvalid ? sv23.y : 0.f);
        }
        pa[0] = pack_half2(s[0][0] * sv01.x, s[0][1] * sv01.y);
        pa[1] = pack_half2(s[0][2] * sv01.x, s[0][3] * sv01.y);
        pa[2] = pack_half2(s[1][0] * sv23.x, s[1][1] * sv23.y);
        pa[3] = pack_half2(s[1][2] * sv23.x, s[1][3] * sv23.y);
      } else {
        pa[0] = pack_half2(s[0][0], s[0][1]);
        pa[1] = pack_half2(s[0][2], s[0][3]);
        pa[2] = pack_half2(s[1][0], s[1][1]);
        pa[3] = pack_half2(s[1][2], s[1][3]);
      }
    }
    // ---- O += P · V (KT: done above, as Oᵀ += Vᵀ · Pᵀ) ----
    if constexpr (INT4 && !KT) {
      const V_pairs vp = v_code_pairs<D>(st, prm, v_off, t);
      mma16816(o[NO - 1], pa, vp.z01, vp.z23);
#pragma unroll
      for (int r = 0; r < D / 64; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t v01 = vp.v01[r][h], v23 = vp.v23[r][h], v01s = v01 >> 8, v23s = v23 >> 8;
          mma16816(o[r * 8 + h], pa, v01 & kNib0, v23 & kNib0);          // dim 0 + h, · 2^-24
          mma16816(o[r * 8 + 2 + h], pa, v01 & kNib1, v23 & kNib1);      // dim 2 + h, · 2^-20
          mma16816(o[r * 8 + 4 + h], pa, v01s & kNib0, v23s & kNib0);    // dim 4 + h, · 2^-24
          mma16816(o[r * 8 + 6 + h], pa, v01s & kNib1, v23s & kNib1);    // dim 6 + h, · 2^-20
        }
      }
    } else if constexpr (!INT4) {
      const uint8_t* vt = st + 16 * KR;
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t r[4];
        const int mi = lane / 8;
        ldmatrix_x4_trans(r, vt + ((lane % 8) + (mi & 1) * 8) * KR + (np * 16 + (mi >> 1) * 8) * 2);
        mma16816(o[2 * np], pa, r[0], r[1]);
        mma16816(o[2 * np + 1], pa, r[2], r[3]);
      }
    }
    __syncwarp();  // the ring slot is refilled next iteration
  }
  cp_async_wait<0>();
  if constexpr (INT4) {
    // O = raw-code sums · 2^24 (S form: n-tiles 8r + 2, 3, 6, 7 · 2^20; KT: rows g + 8 · 2^20) -
    // the zero term (KT: its rows g and g + 8 are the same sums).
#pragma unroll
    for (int n = 0; n < NO - 1; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float f = (KT ? e >= 2 : (n & 2) != 0) ? 0x1p20f : 0x1p24f;
        o[n][e] = o[n][e] * f - o[NO - 1][e] * 0x1p24f;
      }
  }

  // The sums over the lanes holding a row's (KT: column's) other keys.
#pragma unroll
  for (int off = KT ? 4 : 1; off <= (KT ? 16 : 2); off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }

  // ---- Combine the 4 warps in shared memory ----
  __syncthreads();
  float* red_m = reinterpret_cast<float*>(smem);  // [4][16]
  float* red_l = red_m + kWarps * 16;             // [4][16]
  float* red_o = red_l + kWarps * 16;             // [4][16][D], each row's dims swizzled (red_o_at)
  // Dim d of row r (warp · 16 + head) at d ^ (((r / 2) mod 4) · D/32 + (d / 32) mod D/32): a
  // permutation within each 32 dims. KT stores (lanes g, t: dims 16g + c of heads 2t, 2t + 1) hit
  // 2 banks 16-way at D = 128 without it (rows are D floats, dims 16g apart), 32 distinct banks with
  // it; the S form's INT4 stores go from 32-way to 2-way; the reads below (32 consecutive dims of a
  // row a warp) stay conflict-free.
  auto red_o_at = [&](int r, int d) -> float& {
    return red_o[r * D + (d ^ (((r >> 1) & 3) * (D / 32) + ((d >> 5) & (D / 32 - 1))))];
  };
  const int G = p.G;
  if (KT ? g == 0 : t == 0) {
    const int h0 = KT ? 2 * t : g, h1 = KT ? 2 * t + 1 : g + 8;
    red_m[warp * 16 + h0] = m0;
    red_l[warp * 16 + h0] = l0;
    red_m[warp * 16 + h1] = m1;
    red_l[warp * 16 + h1] = l1;
  }
  if constexpr (KT) {
    // Oᵀ tile 4r + 2h + s: row g is dim h + 4s of word g·D/64 + r, row g + 8 dim 2 + h + 4s;
    // columns heads 2t, 2t + 1.
#pragma unroll
    for (int n = 0; n < NO - 1; ++n) {
      const int r = n / 4, h = (n / 2) % 2, s = n % 2;
      const int dg = 8 * (g * (D / 64) + r) + h + 4 * s, dg8 = dg + 2;
      if (2 * t < G) {
        red_o_at(warp * 16 + 2 * t, dg) = o[n][0];
        red_o_at(warp * 16 + 2 * t, dg8) = o[n][2];
      }
      if (2 * t + 1 < G) {
        red_o_at(warp * 16 + 2 * t + 1, dg) = o[n][1];
        red_o_at(warp * 16 + 2 * t + 1, dg8) = o[n][3];
      }
    }
  }
#pragma unroll
  for (int n = 0; n < (KT ? 0 : D / 8); ++n) {
    int d0, d1;  // output dims of columns 2t and 2t+1 of n-tile n
    if constexpr (INT4) {
      d0 = (2 * t) * (D / 8) + n;
      d1 = d0 + D / 8;
    } else {
      d0 = 8 * n + 2 * t;
      d1 = d0 + 1;
    }
    if (g < G) {
      red_o_at(warp * 16 + g, d0) = o[n][0];
      red_o_at(warp * 16 + g, d1) = o[n][1];
    }
    if (g + 8 < G) {
      red_o_at(warp * 16 + g + 8, d0) = o[n][2];
      red_o_at(warp * 16 + g + 8, d1) = o[n][3];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * D; idx += 128) {
    const int row = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_m[w * 16 + row]);
    float L = 0, acc = 0;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(red_m[w * 16 + row] - M);
        L += red_l[w * 16 + row] * f;
        acc += red_o_at(w * 16 + row, d) * f;
      }
    }
    const int h = kvh * G + row;
    if (p.splits == 1) {
      p.out[(int64_t(seq) * p.H + h) * D + d] = __float2half_rn(acc / L);
    } else {
      const int64_t slot = (int64_t(seq) * p.H + h) * p.splits + split;
      p.ws_o[slot * D + d] = M == -INFINITY ? 0.0f : acc / L;
      if (d == 0) p.ws_lse[slot] = M == -INFINITY ? -INFINITY : M + log2f(L);
    }
  }
  if (p.splits == 1) return;

  // ---- The last split block of this (sequence, KV head) to finish combines the splits ----
  // (a second kernel did it: one launch more per step, paid mostly at batch 1-16 where the splits
  // are). out = Σ_s 2^(lse_s - max) o_s / Σ_s 2^(lse_s - max), the partials read from L2 (__ldcg:
  // never a stale L1 line of another block's writes).
  __threadfence();  // this block's partials visible device-wide before its arrival counts
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) {
    uint32_t* arrived = p.arrivals + int64_t(seq) * c.kv_heads + kvh;
    last = atomicAdd(arrived, 1u) == uint32_t(p.splits - 1);
    if (last) *arrived = 0;  // every other split has counted: zero again for the next launch
    __threadfence();
  }
  if (!__syncthreads_or(last)) return;  // (also: every warp is past its reads of red_*)
  // Every L2 round trip here is serial time of the whole launch (~0.5 µs each): v9 made one per
  // split and output element (G·D/128 of them per thread, splits past a multiple of 8 in a rolled
  // loop) and two per head for the weights, ~46 at G = 8 and 5 splits. Now: the G · splits lse
  // (contiguous) in one pass of independent loads, the weights 2^(lse_s - max) / Σ from shared
  // memory (a warp per head), then each thread sums 4 dims of a head with 8 splits' loads in flight.
  float* wgt = reinterpret_cast<float*>(smem);  // [G][splits]
  const int64_t sh0 = int64_t(seq) * p.H + int64_t(kvh) * G;
  const int n_lse = G * p.splits;
  constexpr int kLseLoads = 4;  // per thread and pass (G · splits <= 512 in one pass)
  for (int i0 = 0; i0 < n_lse; i0 += kLseLoads * 128) {
    float v[kLseLoads];
#pragma unroll
    for (int j = 0; j < kLseLoads; ++j) {
      const int i = i0 + j * 128 + threadIdx.x;
      v[j] = i < n_lse ? __ldcg(p.ws_lse + sh0 * p.splits + i) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kLseLoads; ++j)
      if (i0 + j * 128 + threadIdx.x < n_lse) wgt[i0 + j * 128 + threadIdx.x] = v[j];
  }
  __syncthreads();
  for (int row = warp; row < G; row += kWarps) {
    float* w = wgt + row * p.splits;
    float M = -INFINITY, L = 0;
    for (int s = lane; s < p.splits; s += 32) M = fmaxf(M, w[s]);
    M = warp_max(M);
    for (int s = lane; s < p.splits; s += 32) {
      const float f = exp2f(w[s] - M);
      w[s] = f;
      L += f;
    }
#pragma unroll
    for (int off = 16; off; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
    for (int s = lane; s < p.splits; s += 32) w[s] /= L;
  }
  __syncthreads();
  constexpr int kInFlight = 8;  // splits' partial loads in flight per thread
  for (int item = threadIdx.x; item < G * (D / 4); item += 128) {
    const int row = item / (D / 4), d4 = item % (D / 4);
    const float4* o_s = reinterpret_cast<const float4*>(p.ws_o + (sh0 + row) * p.splits * D) + d4;
    const float* w = wgt + row * p.splits;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < p.splits; s0 += kInFlight) {
      float4 v[kInFlight];
#pragma unroll
      for (int j = 0; j < kInFlight; ++j)
        v[j] = s0 + j < p.splits ? __ldcg(o_s + int64_t(s0 + j) * (D / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
        const float f = s0 + j < p.splits ? w[s0 + j] : 0.f;
        acc.x += f * v[j].x;
        acc.y += f * v[j].y;
        acc.z += f * v[j].z;
        acc.w += f * v[j].w;
      }
    }
    __half2* out = reinterpret_cast<__half2*>(p.out + (sh0 + row) * D + 4 * d4);
    out[0] = __floats2half2_rn(acc.x, acc.y);
    out[1] = __floats2half2_rn(acc.z, acc.w);
  }
}

// INT4 pages with K after RoPE and G <= 8 query heads per KV head run decode_kernel's KT form.
template <bool INT4, bool ROPE_K>
bool kt_form(int G) {
  return INT4 && !ROPE_K && G <= 8;
}

// Resident blocks per SM of one form of the kernel (sets its shared-memory attribute once).
template <int D, bool INT4, bool ROPE_K, bool KT>
int occupancy() {
  static int cached = [] {
    constexpr int smem = decode_smem_bytes<D, INT4, ROPE_K>();
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(decode_kernel<D, INT4, ROPE_K, KT>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    int n = 0;
    NIBBLE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel<D, INT4, ROPE_K, KT>, 128, smem));
    return std::max(n, 1);
  }();
  return cached;
}

// ... of the form attention_decode launches for G query heads per KV head (the split plan and the
// workspace bound count its waves: KT runs 5 blocks per SM, the S form 3).
template <int D, bool INT4, bool ROPE_K>
int blocks_per_sm(int G) {
  if constexpr (INT4 && !ROPE_K)
    if (kt_form<INT4, ROPE_K>(G)) return occupancy<D, INT4, ROPE_K, true>();
  return occupancy<D, INT4, ROPE_K, false>();
}

int sm_count() {
  static int n = [] {
    int dev = 0, v = 0;
    NIBBLE_CUDA_CHECK(cudaGetDevice(&dev));
    NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

// The split count attention_plan.h's cost model picks for a batch on this GPU.
template <int D, bool INT4, bool ROPE_K>
int planned_splits(const KVCacheView& c, const AttentionBatch& b, int G) {
  DecodePlanShape shape;
  shape.batch = b.batch;
  shape.kv_heads = c.kv_heads;
  shape.group = G;
  shape.head_dim = D;
  shape.max_seq_len = b.max_seq_len;
  // The layout's 16-token chunk (from dtype and head dim only: a plan needs no pages).
  shape.chunk_bytes = PagedKVLayout{1, c.kv_heads, D, 16, c.dtype}.chunk_bytes();
  shape.sms = sm_count();
  shape.blocks_per_sm = blocks_per_sm<D, INT4, ROPE_K>(G);
  return plan_decode_splits(shape);
}

template <int D, bool INT4, bool ROPE_K>
void launch_decode(const KVCacheView& c, const AttentionBatch& b, DecodeParams p, int forced, AttentionWorkspace& ws,
                   Stream stream) {
  constexpr int smem = decode_smem_bytes<D, INT4, ROPE_K>();
  blocks_per_sm<D, INT4, ROPE_K>(p.G);  // sets the smem attribute of the form launched, once
  p.splits = forced > 0 ? forced : planned_splits<D, INT4, ROPE_K>(c, b, p.G);
  if (p.splits > 1) {
    require(int64_t(b.batch) * c.kv_heads <= kDecodeMaxSplitPairs && p.splits <= kDecodeMaxSplits, "attention_decode",
            "{} splits over {} sequences x {} KV heads: at most {} splits and {} (sequence, KV head) pairs",
            p.splits, b.batch, c.kv_heads, kDecodeMaxSplits, kDecodeMaxSplitPairs);
    const size_t slots = size_t(b.batch) * size_t(p.H) * size_t(p.splits);
    uint8_t* w = static_cast<uint8_t*>(ws.get(decode_workspace_bytes(b.batch, p.H, D, p.splits)));
    p.arrivals = reinterpret_cast<uint32_t*>(w);
    p.ws_o = reinterpret_cast<float*>(w + kDecodeArrivalBytes);
    p.ws_lse = p.ws_o + slots * D;
  }
  const dim3 grid(p.splits, c.kv_heads, b.batch);
  bool launched = false;
  if constexpr (INT4 && !ROPE_K) {
    if (kt_form<INT4, ROPE_K>(p.G)) {
      decode_kernel<D, INT4, ROPE_K, true><<<grid, 128, smem, stream>>>(c, b, p);
      launched = true;
    }
  }
  if (!launched) decode_kernel<D, INT4, ROPE_K><<<grid, 128, smem, stream>>>(c, b, p);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

// f.template operator()<D, INT4, ROPE_K>() for the cache's variant (head_dim 64 or 128).
template <typename F>
auto with_variant(const KVCacheView& c, bool k_before_rope, F&& f) {
  const bool int4 = c.dtype == KVDtype::Int4;
  if (c.head_dim == 128) {
    if (int4) return k_before_rope ? f.template operator()<128, true, true>() : f.template operator()<128, true, false>();
    return k_before_rope ? f.template operator()<128, false, true>() : f.template operator()<128, false, false>();
  }
  if (int4) return k_before_rope ? f.template operator()<64, true, true>() : f.template operator()<64, true, false>();
  return k_before_rope ? f.template operator()<64, false, true>() : f.template operator()<64, false, false>();
}

}  // namespace

int attention_decode_splits(const KVCacheView& c, const AttentionBatch& b, int num_heads, bool k_before_rope) {
  const int G = num_heads / c.kv_heads;
  return with_variant(c, k_before_rope, [&]<int D, bool INT4, bool ROPE_K>() { return planned_splits<D, INT4, ROPE_K>(c, b, G); });
}

size_t attention_decode_workspace_bytes(const KVCacheView& c, int num_heads, bool k_before_rope) {
  return with_variant(c, k_before_rope, [&]<int D, bool INT4, bool ROPE_K>() {
    const int G = num_heads / c.kv_heads;
    return decode_workspace_bound(G, D, sm_count(), blocks_per_sm<D, INT4, ROPE_K>(G));
  });
}

void attention_decode(const KVCacheView& c, const AttentionBatch& b, const AttentionArgs& a, AttentionWorkspace& ws,
                      Stream stream) {
  require(a.num_heads > 0 && a.num_heads % c.kv_heads == 0 && a.num_heads / c.kv_heads <= 16, "attention_decode",
          "{} query heads over {} KV heads: need a multiple, at most 16 per KV head", a.num_heads, c.kv_heads);
  require(b.num_tokens == b.batch, "attention_decode", "decode takes one new token per sequence ({} for {})",
          b.num_tokens, b.batch);
  require(!a.k_before_rope || (a.rope && a.rope->half_dim() * 2 == c.head_dim &&
                               b.max_seq_len <= a.rope->max_positions()),
          "attention_decode", "K stored before RoPE needs a RoPE table covering {} positions", b.max_seq_len);
  require(reinterpret_cast<uintptr_t>(a.out) % 4 == 0 && reinterpret_cast<uintptr_t>(a.q) % 16 == 0,
          "attention_decode", "Q must be 16-byte aligned (16-byte fragment loads), the output 4-byte aligned "
          "(the split combine stores fp16 pairs)");
  if (b.batch == 0) return;
  const float scale = a.softmax_scale > 0 ? a.softmax_scale : 1.0f / std::sqrt(float(c.head_dim));
  const DecodeParams p{a.q, a.out, a.num_heads, a.num_heads / c.kv_heads, a.layer,
                       a.k_before_rope ? a.rope->data() : nullptr, scale * kLog2e, 1, nullptr, nullptr, nullptr};
  with_variant(c, a.k_before_rope, [&]<int D, bool INT4, bool ROPE_K>() {
    launch_decode<D, INT4, ROPE_K>(c, b, p, a.num_splits, ws, stream);
  });
}

}  // namespace nibble::cuda
