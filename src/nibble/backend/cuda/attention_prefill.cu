// attention_append (RoPE + K/V into the paged cache, INT4 quantization on the fly) and
// attention_prefill (causal GQA flash attention of a ragged batch over its paged cache).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "nibble/backend/cuda/attention_device.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/format_device.cuh"
#include "nibble/backend/cuda/hadamard_device.cuh"
#include "nibble/backend/cuda/wgmma.cuh"

namespace nibble::cuda {
namespace {

using namespace attn;

constexpr float kLog2e = 1.4426950408889634f;

// ---- attention_append ------------------------------------------------------------------------

struct AppendParams {
  const __half* qkv;
  int64_t stride;
  int H, Hkv, layer;
  const float2* rope;  // null: no RoPE
  bool rope_k;         // rotate K before storing it
  float clip;
  bool hadamard;       // Q, K, V in the Walsh-Hadamard-rotated basis
  __half* q_out;
};

// Grid (new tokens, head groups of 4): a warp per head vector (Q heads, then K heads, then V
// heads), so a decode step's few tokens still spread over many blocks. A lane holds dims
// lane + 32e: dims i and i + D/2 (a RoPE pair) sit in the same lane.
template <int D, bool INT4>
__global__ void __launch_bounds__(128) append_kernel(KVCacheView c, AttentionBatch b, AppendParams p) {
  constexpr int E = D / 32;
  __shared__ uint8_t codes_smem[4][D];
  const int tok = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int seq = b.token_seq[tok], pos = b.token_pos[tok];
  const int page = b.block_tables[int64_t(seq) * b.max_blocks + (pos >> c.page_shift)];
  const int row = pos & (c.page_size - 1);
  const __half* src = p.qkv + int64_t(tok) * p.stride;
  uint8_t* codes = codes_smem[warp];

  for (int hh = blockIdx.y * 4 + warp; hh < p.H + 2 * p.Hkv; hh += 4 * gridDim.y) {
    float x[E];
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = __half2float(src[int64_t(hh) * D + lane + 32 * e]);
    const bool is_q = hh < p.H, is_k = !is_q && hh < p.H + p.Hkv;
    if (p.rope && (is_q || (is_k && p.rope_k))) {
      const float2* cs = p.rope + int64_t(pos) * (D / 2);
#pragma unroll
      for (int e = 0; e < E / 2; ++e) {
        const float2 r = cs[lane + 32 * e];
        const float a = x[e], bb = x[e + E / 2];
        x[e] = a * r.x - bb * r.y;
        x[e + E / 2] = bb * r.x + a * r.y;
      }
    }
    if (p.hadamard) hadamard_strided(x, lane);
    if (is_q) {
      __half* q = p.q_out + (int64_t(tok) * p.H + hh) * D;
#pragma unroll
      for (int e = 0; e < E; ++e) q[lane + 32 * e] = __float2half_rn(x[e]);
      continue;
    }
    const int kvh = is_k ? hh - p.H : hh - p.H - p.Hkv;
    uint8_t* blk = const_cast<uint8_t*>(block_ptr(c, p.layer, page, kvh));
    if constexpr (!INT4) {
      // Chunk of 16 tokens: K rows, then V rows (kv_cache_paged.h).
      __half* dst = reinterpret_cast<__half*>(blk + (row >> 4) * (64 * D) + ((is_k ? 0 : 16) + (row & 15)) * (2 * D));
#pragma unroll
      for (int e = 0; e < E; ++e) dst[lane + 32 * e] = __float2half_rn(x[e]);
    } else {
      // quant::choose_scale for Int4Asym, rule for rule: the range always contains 0.
      float mn = 0, mx = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        mn = fminf(mn, x[e]);
        mx = fmaxf(mx, x[e]);
      }
      mn = warp_min(mn);
      mx = warp_max(mx);
      const float lo = p.clip * mn;
      const float scale = fp16_scale_device(p.clip * (mx - mn) / 15.0f);
      const float zero = scale == 0 ? 0.0f : fminf(quant::round_half_even(-lo / scale), 15.0f);
#pragma unroll
      for (int e = 0; e < E; ++e) codes[lane + 32 * e] = quant::int_asym_encode(x[e], scale, uint8_t(zero), 4);
      __syncwarp();
      // Chunk of 16 tokens: K codes, V codes, K scales, V scales, K zeros, V zeros.
      uint8_t* chunk = blk + (row >> 4) * (16 * D + 96);
      const int rr = row & 15;
      uint8_t* rowp = chunk + ((is_k ? 0 : 16) + rr) * (D / 2);
      if (lane < D / 8) {
        uint32_t word = 0;
#pragma unroll
        for (int n = 0; n < 8; ++n) word |= uint32_t(codes[8 * lane + (n < 4 ? 2 * n : 2 * (n - 4) + 1)]) << (4 * n);
        reinterpret_cast<uint32_t*>(rowp)[lane] = word;
      }
      if (lane == 0) {
        reinterpret_cast<__half*>(chunk + 16 * D + (is_k ? 0 : 32))[rr] = __float2half_rn(scale);
        chunk[16 * D + 64 + (is_k ? 0 : 16) + rr] = uint8_t(zero);
      }
      __syncwarp();
    }
  }
}

// ---- attention_prefill -----------------------------------------------------------------------

struct PrefillParams {
  const __half* q;
  __half* out;
  int H, G, layer;
  const float2* rope;
  float scale_log2;
};

constexpr int kBM = kPrefillTileRows;  // query rows per block (8 warps x 16)
constexpr int kThreads = kBM * 2;      // 32 threads per 16 rows
constexpr int kBN = 64;                // keys per tile

template <int D, bool INT4>
constexpr int chunk_bytes() {
  return int(kv_chunk_bytes(D, INT4 ? KVDtype::Int4 : KVDtype::Fp16));
}

template <int D, bool INT4>
constexpr int prefill_smem_bytes() {
  constexpr int q_tile = kBM * (D + 8) * 2, kv_tile = kBN * (D + 8) * 2;
  return q_tile + kv_tile * 4 + (INT4 ? 2 * 4 * chunk_bytes<D, true>() : 0);
}

// Copies chunk `bytes` (a multiple of 16) from `src` to `dst`, spread over `n` threads from `i`.
__device__ __forceinline__ void copy_chunk(uint8_t* dst, const uint8_t* src, int bytes, int i, int n) {
  for (int u = i; u < bytes / 16; u += n) cp_async16(dst + u * 16, src + u * 16);
}

// Scores s of keys key0 + 8j + 2t + (e & 1) (m16n8 fragments: elements 0, 1 of row pos_g, 2, 3
// of row pos_g8) to the log2 domain, keys after the row's position at -inf where `mask`; returns
// the lane's maxima of the two rows.
template <int NJ>
__device__ __forceinline__ float2 scale_mask_max(float (&s)[NJ][4], float scale_log2, bool mask, int key0, int t,
                                                 int pos_g, int pos_g8) {
  float mx_g = -INFINITY, mx_g8 = -INFINITY;
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = key0 + j * 8 + 2 * t + (e & 1);
      float v = s[j][e] * scale_log2;
      if (mask && key > (e < 2 ? pos_g : pos_g8)) v = -INFINITY;
      s[j][e] = v;
      if (e < 2) mx_g = fmaxf(mx_g, v);
      else mx_g8 = fmaxf(mx_g8, v);
    }
  return make_float2(mx_g, mx_g8);
}

// One block: 128 new tokens of one sequence x one query head; 8 warps of 16 rows. Key tiles of 64
// from the paged cache (earlier chunks and this one: the append kernel wrote them first), fp16
// tiles in shared memory (INT4 dequantized there), mma.sync m16n8k16, online softmax in registers.
template <int D, bool INT4, bool ROPE_K>
__global__ void __launch_bounds__(kThreads) prefill_kernel(KVCacheView c, AttentionBatch b, PrefillParams p) {
  constexpr int RS = D + 8;  // smem row stride in halfs (16 bytes of padding: ldmatrix conflict-free)
  constexpr int TILE = kBN * RS;  // one K or V tile
  extern __shared__ __align__(16) uint8_t smem[];
  __half* Qs = reinterpret_cast<__half*>(smem);
  __half* KVs = Qs + kBM * RS;  // K[2], V[2]; INT4: then the raw chunks [2][4]
  uint8_t* raw = reinterpret_cast<uint8_t*>(KVs + 4 * TILE);  // INT4 only

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int h = blockIdx.y, kvh = h / p.G;
  const int2 tile = b.tiles[blockIdx.x];
  const int seq = tile.x, q0 = tile.y;
  const int tok_base = b.cu_new[seq];
  const int n_new = b.cu_new[seq + 1] - tok_base;
  const int len = b.seq_lens[seq];
  const int context = len - n_new;
  const int rows = min(kBM, n_new - q0);
  const int kv_end = context + q0 + rows;  // keys [0, kv_end) are visible to some row
  const int n_tiles = (kv_end + kBN - 1) / kBN;
  const int32_t* table = b.block_tables + int64_t(seq) * b.max_blocks;

  // Q tile.
  for (int i = tid; i < kBM * (D / 8); i += kThreads) {
    const int r = i / (D / 8), cc = i % (D / 8);
    const bool ok = r < rows;
    const __half* src = p.q + ((int64_t(tok_base + q0 + (ok ? r : 0))) * p.H + h) * D + cc * 8;
    cp_async16(Qs + r * RS + cc * 8, src, ok ? 16 : 0);
  }

  // Tile kt = 4 chunks of 16 keys, 64 threads each.
  auto load_tile = [&](int kt, int buf) {
    const int ch = tid / 64, i64 = tid % 64;
    const int key0 = kt * kBN + ch * 16;
    if constexpr (INT4) {
      if (key0 >= kv_end) return;  // the dequantization writes zeros for these keys
    }
    // Past the end: zero-filled rows (masked P is 0, and V must stay finite: 0 * NaN is NaN).
    const uint8_t* chunk = key0 < kv_end ? block_ptr(c, p.layer, table[key0 >> c.page_shift], kvh) +
                                               ((key0 & (c.page_size - 1)) >> 4) * int64_t(chunk_bytes<D, INT4>())
                                         : c.pool;
    if constexpr (!INT4) {
      __half* Kd = KVs + buf * TILE + ch * 16 * RS;
      __half* Vd = KVs + (2 + buf) * TILE + ch * 16 * RS;
#pragma unroll 4
      for (int u = i64; u < 32 * (D / 8); u += 64) {
        const int row = u / (D / 8), cc = u % (D / 8);  // rows 0..15 K, 16..31 V
        const bool ok = key0 + (row & 15) < kv_end;
        cp_async16((row < 16 ? Kd : Vd) + (row & 15) * RS + cc * 8, ok ? chunk + u * 16 : chunk, ok ? 16 : 0);
      }
    } else {
      copy_chunk(raw + (buf * 4 + ch) * chunk_bytes<D, true>(), chunk, chunk_bytes<D, true>(), i64, 64);
    }
  };

  // INT4: raw chunks -> fp16 tiles F[2], dequantized one tile ahead of the MMAs with no barrier in
  // between (warps overlap one's dequantization with another's MMAs). K words w and w + D/16 of a
  // row go together: a RoPE pair when K is stored before RoPE, rotated right here.
  constexpr int CB = chunk_bytes<D, INT4>();
  auto dequant = [&](int kt) {
    const uint8_t* rc = raw + (kt & 1) * 4 * CB;
    __half* Kf = KVs + (kt & 1) * TILE;
    __half* Vf = KVs + (2 + (kt & 1)) * TILE;
    for (int i = tid; i < kBN * (D / 16); i += kThreads) {
      const int r = i / (D / 16), w = i % (D / 16), key = kt * kBN + r;
      const uint8_t* ch = rc + (r / 16) * CB;
      const int rr = r % 16;
      uint32_t lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
      if (key < kv_end) {
        const uint32_t* row = reinterpret_cast<const uint32_t*>(ch + rr * (D / 2));
        const uint32_t w0 = row[w], w1 = row[w + D / 16];
        const __half sh = reinterpret_cast<const __half*>(ch + 16 * D)[rr];
        const int z = ch[16 * D + 64 + rr];
        if constexpr (!ROPE_K) {
          const __half2 ss = __halves2half2(sh, sh);
          const __half zh = __int2half_rn(1024 + z);
          const __half2 zz = __halves2half2(zh, zh);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            lo[k] = h2u(dequant_pair(w0, k, zz, ss));
            hi[k] = h2u(dequant_pair(w1, k, zz, ss));
          }
        } else {
          const float sc = __half2float(sh);
          const float2* cs = p.rope + int64_t(key) * (D / 2) + w * 8;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            float a[2], bb[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {  // dims 8w + 2k + e and + D/2; format.h int_asym_decode
              a[e] = float(int((w0 >> (4 * (k + 4 * e))) & 15u) - z) * sc;
              bb[e] = float(int((w1 >> (4 * (k + 4 * e))) & 15u) - z) * sc;
            }
            const float2 c0 = cs[2 * k], c1 = cs[2 * k + 1];
            lo[k] = pack_half2(a[0] * c0.x - bb[0] * c0.y, a[1] * c1.x - bb[1] * c1.y);
            hi[k] = pack_half2(bb[0] * c0.x + a[0] * c0.y, bb[1] * c1.x + a[1] * c1.y);
          }
        }
      }
      *reinterpret_cast<uint4*>(Kf + r * RS + w * 8) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      *reinterpret_cast<uint4*>(Kf + r * RS + (w + D / 16) * 8) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    }
    for (int i = tid; i < kBN * (D / 8); i += kThreads) {
      const int r = i / (D / 8), w = i % (D / 8);
      const uint8_t* ch = rc + (r / 16) * CB;
      const int rr = r % 16;
      uint4 outv = make_uint4(0, 0, 0, 0);
      if (kt * kBN + r < kv_end) {
        const uint32_t word = reinterpret_cast<const uint32_t*>(ch + 8 * D + rr * (D / 2))[w];
        const __half sh = reinterpret_cast<const __half*>(ch + 16 * D + 32)[rr];
        const int z = ch[16 * D + 80 + rr];
        const __half2 ss = __halves2half2(sh, sh);
        const __half zh = __int2half_rn(1024 + z);
        const __half2 zz = __halves2half2(zh, zh);
        outv.x = h2u(dequant_pair(word, 0, zz, ss));
        outv.y = h2u(dequant_pair(word, 1, zz, ss));
        outv.z = h2u(dequant_pair(word, 2, zz, ss));
        outv.w = h2u(dequant_pair(word, 3, zz, ss));
      }
      *reinterpret_cast<uint4*>(Vf + r * RS + w * 8) = outv;
    }
  };

  load_tile(0, 0);
  cp_async_commit();
  if constexpr (INT4) {
    if (n_tiles > 1) load_tile(1, 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    dequant(0);
  }

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0;
  float m_g = -INFINITY, m_g8 = -INFINITY, l_g = 0, l_g8 = 0;
  const int wr0 = warp * 16;
  const int pos_g = context + q0 + wr0 + g, pos_g8 = pos_g + 8;

  for (int kt = 0; kt < n_tiles; ++kt) {
    cp_async_wait<0>();
    __syncthreads();
    __half* Ks = KVs + (kt & 1) * TILE;
    __half* Vs = KVs + (2 + (kt & 1)) * TILE;
    if constexpr (INT4) {
      if (kt + 2 < n_tiles) load_tile(kt + 2, kt & 1);
      cp_async_commit();
      if (kt + 1 < n_tiles) dequant(kt + 1);
    } else {
      if (kt + 1 < n_tiles) load_tile(kt + 1, (kt + 1) & 1);
      cp_async_commit();
      if constexpr (ROPE_K) {
        // K was stored before RoPE: rotate the tile in place (pairs i, i + D/2).
        for (int i = tid; i < kBN * (D / 2); i += kThreads) {
          const int r = i / (D / 2), d = i % (D / 2);
          const int key = kt * kBN + r;
          if (key < kv_end) {
            const float2 cs = p.rope[int64_t(key) * (D / 2) + d];
            const float a = __half2float(Ks[r * RS + d]), bb = __half2float(Ks[r * RS + d + D / 2]);
            Ks[r * RS + d] = __float2half_rn(a * cs.x - bb * cs.y);
            Ks[r * RS + d + D / 2] = __float2half_rn(bb * cs.x + a * cs.y);
          }
        }
        __syncthreads();
      }
    }
    if (kt == 0) {
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(qf[ks], Qs + (wr0 + (lane % 8) + ((lane / 8) % 2) * 8) * RS + ks * 16 + (lane / 16) * 8);
    }
    // Every key of this tile lies after every row of this warp: nothing to do.
    if (kt * kBN > context + q0 + wr0 + 15) continue;

    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0;
#pragma unroll
      for (int ks = 0; ks < D / 16; ks += 2) {
        uint32_t r[4];
        ldmatrix_x4(r, Ks + (j * 8 + (lane % 8)) * RS + ks * 16 + (lane / 8) * 8);
        mma16816(s[j], qf[ks], r[0], r[1]);
        mma16816(s[j], qf[ks + 1], r[2], r[3]);
      }
    }
    const bool need_mask = kt * kBN + kBN - 1 > context + q0 + wr0;
    const float2 mx = scale_mask_max(s, p.scale_log2, need_mask, kt * kBN, t, pos_g, pos_g8);
    online_softmax_step(s, o, mx.x, mx.y, m_g, m_g8, l_g, l_g8);
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                              pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t r[4];
        const int mi = lane / 8;
        ldmatrix_x4_trans(r, Vs + (kk * 16 + (lane % 8) + (mi & 1) * 8) * RS + np * 16 + (mi >> 1) * 8);
        mma16816(o[2 * np], pa, r[0], r[1]);
        mma16816(o[2 * np + 1], pa, r[2], r[3]);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_g += __shfl_xor_sync(0xffffffffu, l_g, off);
    l_g8 += __shfl_xor_sync(0xffffffffu, l_g8, off);
  }
  const float inv_g = 1.0f / l_g, inv_g8 = 1.0f / l_g8;
  const int r_g = wr0 + g, r_g8 = r_g + 8;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    if (r_g < rows)
      *reinterpret_cast<uint32_t*>(p.out + (int64_t(tok_base + q0 + r_g) * p.H + h) * D + nt * 8 + 2 * t) =
          pack_half2(o[nt][0] * inv_g, o[nt][1] * inv_g);
    if (r_g8 < rows)
      *reinterpret_cast<uint32_t*>(p.out + (int64_t(tok_base + q0 + r_g8) * p.H + h) * D + nt * 8 + 2 * t) =
          pack_half2(o[nt][2] * inv_g8, o[nt][3] * inv_g8);
  }
}

template <int D, bool INT4, bool ROPE_K>
void launch_prefill(const KVCacheView& c, const AttentionBatch& b, const PrefillParams& p, Stream stream) {
  constexpr int smem = prefill_smem_bytes<D, INT4>();
  static bool configured = false;
  if (!configured) {
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel<D, INT4, ROPE_K>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    configured = true;
  }
  prefill_kernel<D, INT4, ROPE_K><<<dim3(b.num_tiles, p.H), kThreads, smem, stream>>>(c, b, p);
  NIBBLE_CUDA_CHECK_LAUNCH();
}


// ---- attention_prefill on wgmma (sm_90a): head dim 128, FP16 or INT4 pages, K after RoPE -----
//
// FlashAttention-3's structure over the paged cache. Work item = 128 query rows of one sequence x
// one head (the tiles of the mma.sync kernel); persistent blocks, one per SM, walk the items. The
// producer warpgroups (FP16: warpgroup 0, 56 registers; INT4: 0 for K and 1 for V, 32 registers
// each) fill rings of 2 K tiles and 2 V tiles of kWgBN keys (fp16, 128-byte swizzled) that run on
// from item to item. FP16 pages: 16-byte cp.async copies straight from the pages, the swizzle
// computed in the address, each thread's copies completing as one arrival on the tile's `full`
// barrier. INT4 pages: the raw K or V halves of the chunks by bulk copies into a double buffer of
// each producer warpgroup, then dequantized into the fp16 tile (exactly fp16 of format.h's decode,
// as the mma.sync kernel does), `fence.proxy.async`, arrival. The last two warpgroups (224
// registers) are the consumers, 64 query rows each: S = Q·Kᵀ
// by 8 `wgmma m64n128k16` (Q and K from shared memory, both K-major), online softmax in registers
// (the accumulator's m16n8-style fragment: rows g, g + 8 of each warp), P converted in place to the
// k16 A-register fragment, O += P·V by 8 register-A wgmma (V [key][dim] is N-major for B: the
// descriptor's transpose bit). K and V have their own rings and `empty` barriers (one arrival per
// consumer warp): a consumer releases K of tile k once Q·K is done and V of tile k - 1 once P·V is,
// while it holds both (the intra-warpgroup overlap below), so 2 + 2 stages never stall the producer.
//
// Shared-memory tiles (Q, each K and V stage): two 64-dim halves, each `rows` x 128 bytes with the
// 128-byte swizzle (16-byte piece c of row r at r * 128 + ((c ^ (r % 8)) << 4), halves 1024-byte
// aligned). Q and K are K-major (descriptor SBO = 1024 between 8-row groups; a k16 step adds 32
// bytes inside a half), V is MN-major (LBO = the half's bytes between the two 64-dim halves of N,
// SBO = 1024 between 8-key groups; a k16 step is 16 keys = 2048 bytes).
constexpr int kWgD = 128;
constexpr int kWgBN = 128;                    // keys per tile
// Producer warpgroups: FP16 one; INT4 two, one dequantizing K and one V (each tile's dequantization
// is ~650 dependent instructions a producer thread; one warp a scheduler running them all set INT4's
// pace), then 2 consumer warpgroups.
template <bool INT4>
constexpr int kWgProducers = INT4 ? 2 : 1;
template <bool INT4>
constexpr int kWgThreads = 128 * (kWgProducers<INT4> + 2);
constexpr int kWgHalf = kWgBN * 128;          // one 64-dim half of a K or V tile (bytes)
constexpr int kWgTile = 2 * kWgHalf;          // one K or V tile
constexpr int kWgQHalf = kBM * 128;           // one 64-dim half of a Q tile
constexpr int kWgQ = 2 * kWgQHalf;            // one Q tile; Q ring [2] (an item's, the next one's)
constexpr int kWgK = 2 * kWgQ;                // K ring [2], then V ring [2]
constexpr int kWgV = kWgK + 2 * kWgTile;
constexpr int kWgRaw = kWgV + 2 * kWgTile;    // INT4: raw K halves of a tile [2], then raw V halves [2]
// INT4 chunk (16 tokens, kv_cache_paged.h): K codes at 0, V codes at 8D, K scales at 16D, V scales
// at 16D + 32, K zeros at 16D + 64, V zeros at 16D + 80. A raw half (K or V of a chunk) in shared
// memory: codes, then the 16 scales, then the 16 zeros.
constexpr int kWgRawCodes = 8 * kWgD, kWgRawHalfChunk = kWgRawCodes + 32 + 16;
constexpr int kWgRawHalf = (kWgBN / 16) * kWgRawHalfChunk;  // a tile's raw K or V
template <bool INT4>
constexpr int wg_bars() {  // full_k[2], full_v[2], empty_k[2], empty_v[2], q_full[2], q_empty[2], raw_full[4], raw_free[4]
  return kWgRaw + (INT4 ? 4 * kWgRawHalf : 0);
}
template <bool INT4>
constexpr int wg_smem() {
  return wg_bars<INT4>() + 20 * 8 + 1024;  // + alignment slack of the dynamic base
}
static_assert(kBM == 128, "two consumer warpgroups of 64 rows");
static_assert(wg_smem<true>() <= 227 * 1024, "shared memory per block");
static_assert(kWgRawHalfChunk % 16 == 0 && 2 * kWgRawHalfChunk == chunk_bytes<kWgD, true>(), "16-byte bulk copies of whole chunks");

// Byte offset of 16-byte piece c (0..15 over the 128 dims) of row r in a swizzled two-half tile.
__device__ __forceinline__ uint32_t swizzled(int r, int c, int half_bytes) {
  return (c / 8) * half_bytes + r * 128 + (((c % 8) ^ (r % 8)) << 4);
}

template <bool INT4, bool PINGPONG>
__global__ void __launch_bounds__(kWgThreads<INT4>, 1) prefill_wgmma_kernel(KVCacheView c, AttentionBatch b, PrefillParams p) {
  constexpr int D = kWgD, CB = chunk_bytes<D, INT4>();
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (sm90::smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* Qs = smem;
  uint64_t* full_k = reinterpret_cast<uint64_t*>(smem + wg_bars<INT4>());
  uint64_t* full_v = full_k + 2;
  uint64_t* empty_k = full_k + 4;
  uint64_t* empty_v = full_k + 6;
  // Indexed by the block's item count n: Q tile n & 1, phase (n >> 1) & 1.
  uint64_t* q_full = full_k + 8;    // the producer's copies of item n's Q rows landed
  uint64_t* q_empty = full_k + 10;  // the consumers are done with item n's Q
  // INT4, K (+0) or V (+2), indexed by ring position r (below): stage or raw buffer r & 1, phase
  // (r >> 1) & 1.
  uint64_t* raw_full = full_k + 12;  // the raw K or V halves of position r landed in raw buffer r & 1
  uint64_t* raw_free = full_k + 16;  // every warp of K's or V's producer warpgroup dequantized position r's

  // Persistent blocks, one per SM: work items (head, tile of b.tiles), head-major as the grid of
  // one block per item was (b.tiles is longest first; the items running at once share one head's
  // K and V in L2), dealt in rounds of gridDim.x, the order of the blocks reversed every other
  // round (a plain round robin hands block 0 the longest item of every round). Every role walks the
  // same items, and the rings run on across them: the producer fills the next item's first tiles
  // while the consumers finish the current one (a block per item left each item's start, ~1-2 µs
  // of copies before the first wgmma, uncovered: 512-token prompts have 1-4 key tiles an item).
  // The current item (start_item):
  int h = 0, kvh = 0, tok_base = 0, context = 0, q0 = 0, rows = 0;
  int kv_end = 0;   // keys [0, kv_end) are visible to some row
  int n_tiles = 0;  // key tiles of kWgBN
  const int32_t* table = nullptr;
  int ring0 = 0;    // the rings' position of its tile 0: tile kt uses stage (ring0 + kt) & 1
  // Makes the block's item n the current one; false past the last.
  const auto start_item = [&](int n) {
    const int item = n * int(gridDim.x) + (n & 1 ? int(gridDim.x - 1 - blockIdx.x) : int(blockIdx.x));
    if (item >= b.num_tiles * p.H) return false;
    const int2 tile = b.tiles[item % b.num_tiles];
    const int seq = tile.x;
    h = item / b.num_tiles;
    kvh = h / p.G;
    q0 = tile.y;
    tok_base = b.cu_new[seq];
    const int n_new = b.cu_new[seq + 1] - tok_base;
    context = b.seq_lens[seq] - n_new;
    rows = min(kBM, n_new - q0);
    kv_end = context + q0 + rows;
    n_tiles = (kv_end + kWgBN - 1) / kWgBN;
    table = b.block_tables + int64_t(seq) * b.max_blocks;
    return true;
  };
  const auto k_stage = [&](int kt) { return smem + kWgK + ((ring0 + kt) & 1) * kWgTile; };
  const auto v_stage = [&](int kt) { return smem + kWgV + ((ring0 + kt) & 1) * kWgTile; };
  // The producer reads the page-table entry of a chunk a step before it copies the chunk (the
  // load's latency then hides behind that step's work), -1 for a chunk wholly past kv_end...
  const auto page_of = [&](int key0) { return key0 < kv_end ? table[key0 >> c.page_shift] : -1; };
  // ... and the 16-token chunk of key0 in that page.
  const auto chunk_at = [&](int page, int key0) {
    return block_ptr(c, p.layer, page, kvh) + ((key0 & (c.page_size - 1)) >> 4) * int64_t(CB);
  };

  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      sm90::mbar_init(&full_k[i], 128);  // the producer threads (their cp.async completions for FP16)
      sm90::mbar_init(&full_v[i], 128);
      sm90::mbar_init(&empty_k[i], 8);  // the consumer warps
      sm90::mbar_init(&empty_v[i], 8);
      for (int kv = 0; kv < 4; kv += 2) {
        sm90::mbar_init(&raw_full[kv + i], 1);  // the copier's arrive.expect_tx
        sm90::mbar_init(&raw_free[kv + i], 4);  // the warps of the K or V producer warpgroup
      }
      sm90::mbar_init(&q_full[i], 128);  // the producer threads' cp.async completions
      sm90::mbar_init(&q_empty[i], 8);   // the consumer warps
    }
    sm90::mbar_init_fence();
  }
  __syncthreads();

  // The warpgroup index through a shuffle: ptxas then knows it is warp-uniform, and so are the role
  // branch and the consumers' loop bounds derived from it. Otherwise every wgmma sits in a path it
  // takes as divergent and it serializes them (ptxas -v: C7518, a WARPGROUP.DEPBAR after each HGMMA).
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x / 128), 0), lane = threadIdx.x % 32;
  if (wg < kWgProducers<INT4>) {
    // INT4: 2 x 128 threads at 32 and 2 x 128 consumers at 224 fill the SM's 64K registers.
    sm90::setmaxnreg_dec<INT4 ? 32 : 56>();
    // Tile kt's K or V stage is free once the consumers released the tile two ring positions back.
    const auto wait_free = [&](uint64_t* empty, int kt) {
      const int r = ring0 + kt;
      if (r >= 2) sm90::mbar_wait(&empty[r & 1], ((r >> 1) - 1) & 1);
    };
    // The Q rows of the block's item n (zero past `rows`) into Q tile n & 1, once the consumers are
    // done with item n - 2's: the producer copies them ahead, so an item's first Q·K does not wait
    // for Q (the consumers copied it themselves at each item's start before: ~1 µs, exposed).
    const auto copy_q = [&](int n) {
      if (n >= 2) sm90::mbar_wait(&q_empty[n & 1], ((n >> 1) - 1) & 1);
      uint8_t* dst = Qs + (n & 1) * kWgQ;
#pragma unroll 1
      for (int i = threadIdx.x; i < kBM * (D / 8); i += 128) {
        const int r = i / (D / 8), piece = i % (D / 8);
        const bool ok = r < rows;
        cp_async16(dst + swizzled(r, piece, kWgQHalf), p.q + (int64_t(tok_base + q0 + (ok ? r : 0)) * p.H + h) * D + piece * 8,
                   ok ? 16 : 0);
      }
      sm90::cp_async_mbar_arrive(&q_full[n & 1]);
    };
    if constexpr (!INT4) {
      // Thread i copies chunk i / 16 of every tile (16 keys): 16-byte piece i % 16 of its 16 K rows
      // and its 16 V rows. Its chunk's address is one page-table read a tile, issued a step ahead
      // (the 8 chunks' reads in parallel across the threads), and every copy of a chunk is that
      // address plus a constant: ~2 instructions a copy. (Computing each chunk's address in every
      // thread, one after another, made the producer a serial chain of ~45 dependent instructions a
      // chunk that could not keep up: ncu, the consumers' top stall was the wait for K.)
      const int my_chunk = threadIdx.x / 16, piece = threadIdx.x % 16;
      // Byte offset of key row r (0..7) of this thread's chunk and piece in a stage; rows r + 8
      // are 1024 bytes on (same swizzled column).
      uint32_t row_off[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) row_off[r] = swizzled(my_chunk * 16 + r, piece, kWgHalf);
      // This thread's chunk and piece of tile kt, whose page is `page` (c.pool for a chunk wholly
      // past kv_end: nothing is read there).
      const auto chunk_ptr = [&](int kt, int page) {
        return page < 0 ? c.pool : chunk_at(page, kt * kWgBN + my_chunk * 16) + piece * 16;
      };
      // K (first_row 0) or V (16) rows of tile kt's chunk at src into the stage dst.
      const auto copy_rows = [&](int kt, const uint8_t* src, uint8_t* dst, int first_row) {
        const int key0 = kt * kWgBN + my_chunk * 16;
        if (key0 + 16 <= kv_end) {  // a whole chunk
#pragma unroll
          for (int r = 0; r < 16; ++r) cp_async16(dst + row_off[r % 8] + (r / 8) * 1024, src + (first_row + r) * 256);
          return;
        }
        // The chunk of the end: rows past it zero (masked scores; V must stay finite, 0 * NaN is
        // NaN); chunks wholly past it read nothing.
#pragma unroll
        for (int r = 0; r < 16; ++r) {
          const bool ok = key0 + r < kv_end;
          cp_async16(dst + row_off[r % 8] + (r / 8) * 1024, ok ? src + (first_row + r) * 256 : c.pool, ok ? 16 : 0);
        }
      };
      // Step kt issues K(kt), then V(kt - 1): the consumers' order (slot kt waits for K(kt), then
      // V(kt - 1)). K(kt)'s stage is freed in the middle of slot kt - 2 (Q·K(kt - 2) done), V's only
      // at its end (P·V(kt - 3) done): K no longer waits behind V of the same tile.
      for (int n = 0; start_item(n); ++n) {
        copy_q(n);
        const uint8_t* chunk_prev = c.pool;  // tile kt - 1's (its V rows)
        int page = page_of(my_chunk * 16);  // tile kt's
        for (int kt = 0; kt <= n_tiles; ++kt) {
          const int page_next = page_of((kt + 1) * kWgBN + my_chunk * 16);  // read now, used next step
          const uint8_t* chunk = chunk_ptr(kt, page);
          if (kt < n_tiles) {
            wait_free(empty_k, kt);
            copy_rows(kt, chunk, k_stage(kt), 0);
            sm90::cp_async_mbar_arrive(&full_k[(ring0 + kt) & 1]);
          }
          if (kt > 0) {
            wait_free(empty_v, kt - 1);
            copy_rows(kt - 1, chunk_prev, v_stage(kt - 1), 16);
            sm90::cp_async_mbar_arrive(&full_v[(ring0 + kt - 1) & 1]);
          }
          chunk_prev = chunk;
          page = page_next;
        }
        ring0 += n_tiles;
      }
    } else {
      // Warpgroup 0 dequantizes K, warpgroup 1 V, each from a raw ring of its own (raw_full /
      // raw_free + 0 for K, + 2 for V) that its warp 0 fills: two warps a scheduler run independent
      // dequantization chains, and neither half waits for the other's stage to free (V(kt)'s frees
      // only in slot kt, K(kt)'s in slot kt - 2). IS_V a compile-time flag: every K/V-dependent
      // offset is an immediate (32 registers a thread; as run-time values they spilled).
      const auto produce = [&](auto v_tag) {
        constexpr bool IS_V = decltype(v_tag)::value;
        constexpr int kv = IS_V ? 2 : 0;
        uint8_t* const raw = smem + kWgRaw + kv * kWgRawHalf;  // this warpgroup's raw buffers [2]
        const int pt = threadIdx.x % 128;                     // thread of the producer warpgroup
        // Lane ch < 8 of warp 0 copies chunk ch of a tile (those holding keys < kv_end) into the raw
        // buffer: the K or V codes, scales and zeros, three bulk copies (TMA), counted in bytes on
        // raw_full after lane 0 announced them. The buffer of position r is free once every warp of
        // the warpgroup arrived on raw_free for position r - 2: only warp 0 waits for that. The
        // page-table entry is read right there, not a step ahead, and the chunk's address comes from
        // a 32-bit chunk index (a pool in device memory has < 2^31 chunks of 2144 bytes): at 32
        // registers a thread, every value the copier keeps across the dequantization is a spill.
        const bool copier = pt < kWgBN / 16;
        const auto copy_raw = [&](int kt) {
          const int r = ring0 + kt;
          if (r >= 2) sm90::mbar_wait(&raw_free[kv + (r & 1)], ((r >> 1) - 1) & 1);
          const int n_chunks = min(kWgBN / 16, (kv_end - kt * kWgBN + 15) / 16);
          if (lane == 0) sm90::mbar_arrive_expect_tx(&raw_full[kv + (r & 1)], n_chunks * kWgRawHalfChunk);
          __syncwarp(0x000000ffu);
          if (lane < n_chunks) {
            const int key0 = kt * kWgBN + lane * 16;
            const uint32_t block = uint32_t((p.layer * int(c.num_pages) + table[key0 >> c.page_shift]) * c.kv_heads + kvh);
            const uint32_t chunk = (block << (c.page_shift - 4)) + uint32_t((key0 & (c.page_size - 1)) >> 4);
            const uint8_t* src = c.pool + uint64_t(chunk) * CB;  // block_ptr + chunk_at in chunks
            uint8_t* dst = raw + (r & 1) * kWgRawHalf + lane * kWgRawHalfChunk;
            uint64_t* landed = &raw_full[kv + (r & 1)];
            sm90::bulk_load(dst, src + (IS_V ? 8 * D : 0), kWgRawCodes, landed);
            sm90::bulk_load(dst + kWgRawCodes, src + 16 * D + (IS_V ? 32 : 0), 32, landed);
            sm90::bulk_load(dst + kWgRawCodes + 32, src + 16 * D + 64 + (IS_V ? 16 : 0), 16, landed);
          }
        };
        // Thread i dequantizes words w = i % 8 and w + 8 (dims 8w.., 64 + 8w..: piece w of each
        // 64-dim half) of keys i / 8 + 16j, j = 0..7 (chunk j, row i / 8): key % 8 is fixed, so is
        // the swizzled column. Keys past kv_end (stale or never copied bytes: finite codes and
        // zeros, any scale) get scale 0, so they become zeros without a branch.
        const int w = pt % 8, rr = pt / 8;
        const uint32_t col = uint32_t(w ^ (rr & 7)) << 4;
        // Tile kt's K or V (landed in raw buffer r & 1) into its stage; then the buffer is released.
        const auto dequant = [&](int kt) {
          const int r = ring0 + kt;
          sm90::mbar_wait(&raw_full[kv + (r & 1)], (r >> 1) & 1);
          wait_free(IS_V ? empty_v : empty_k, kt);
          uint8_t* dst = smem + (IS_V ? kWgV : kWgK) + (r & 1) * kWgTile + rr * 128 + col;
          const uint8_t* rc = raw + (r & 1) * kWgRawHalf;
          const int live = kv_end - kt * kWgBN - rr;  // key rr + 16j is live where 16j < live
          // Not unrolled: unrolled, ptxas spills at 32 registers; a key's ~40 instructions take a
          // few hundred cycles, 8 of them far less than a consumer slot (~3000 cycles at 8192).
#pragma unroll 1
          for (int j = 0; j < kWgBN / 16; ++j) {
            const uint8_t* ch = rc + j * kWgRawHalfChunk;
            const uint32_t* row = reinterpret_cast<const uint32_t*>(ch + rr * (D / 2));
            const uint16_t scale_bits = reinterpret_cast<const uint16_t*>(ch + kWgRawCodes)[rr];
            const uint32_t zero = ch[kWgRawCodes + 32 + rr];
            const uint32_t live_scale = 16 * j < live ? scale_bits : 0u;
            const __half2 ss = u2h(live_scale * 0x00010001u);
            *reinterpret_cast<uint4*>(dst + j * 16 * 128) = dequant_word(row[w], zero, ss);
            *reinterpret_cast<uint4*>(dst + kWgHalf + j * 16 * 128) = dequant_word(row[w + 8], zero, ss);
          }
          sm90::fence_proxy_async();  // these generic writes -> the consumers' wgmma reads
          sm90::mbar_arrive(&(IS_V ? full_v : full_k)[r & 1]);
          __syncwarp();  // this warp's reads of the raw buffer are done
          if (lane == 0) sm90::mbar_arrive(&raw_free[kv + (r & 1)]);
        };
        // Step kt: copy tile kt + 1's half (its buffer was freed in step kt - 1), then dequantize
        // tile kt's, copied a step ago. Warpgroup 0 also copies the items' Q rows.
        for (int n = 0; start_item(n); ++n) {
          if constexpr (!IS_V) copy_q(n);
          if (copier) copy_raw(0);
          for (int kt = 0; kt < n_tiles; ++kt) {
            if (copier && kt + 1 < n_tiles) copy_raw(kt + 1);
            dequant(kt);
          }
          ring0 += n_tiles;
        }
      };
      if (wg == 1) produce(std::true_type{});
      else produce(std::false_type{});
    }
    cp_async_wait<0>();  // no copy outlives its thread
    return;
  }

  sm90::setmaxnreg_inc<224>();
  const int cw = wg - kWgProducers<INT4>, ctid = threadIdx.x - 128 * wg;  // consumer warpgroup 0/1: rows 64 cw ..
  const int warp = ctid / 32, g = lane / 4, t = lane % 4;
  const int wg_row0 = 64 * cw;
  using sm90::Swizzle;
  const uint64_t q_desc0 = sm90::smem_desc(sm90::smem_addr(Qs + wg_row0 * 128), 16, 1024, Swizzle::B128);
  uint64_t q_desc = q_desc0;  // of the current item's Q tile
  const uint64_t k_desc0 = sm90::smem_desc(sm90::smem_addr(smem + kWgK), 16, 1024, Swizzle::B128);
  const uint64_t v_desc0 = sm90::smem_desc(sm90::smem_addr(smem + kWgV), kWgHalf, 1024, Swizzle::B128);
  // Descriptor of k16 step ks inside a K-major two-half tile (start address in 16-byte units).
  const auto k_step = [](int ks, int half_bytes) { return uint64_t(((ks / 4) * half_bytes + (ks % 4) * 32) >> 4); };

  float o[D / 8][4], s[kWgBN / 8][4];
  // P of tile kt as k16 A fragments in buffer kt & 1: P·V(kt - 1) reads one buffer while tile kt's
  // softmax fills the other, so ptxas has no register of an in-flight wgmma to wait for there.
  uint32_t pa[2][kWgBN / 16][4];
#pragma unroll
  for (int j = 0; j < kWgBN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0;
  float m_g, m_g8, l_g, l_g8;  // the rows' running maxima and sums (reset for each item)
  float2 al = make_float2(1.0f, 1.0f);  // the output factors of the last softmax
  const int row_g = wg_row0 + warp * 16 + g;  // this lane's rows row_g, row_g + 8 of the block
  int pos_g = 0, pos_g8 = 0;                  // their positions in the item's sequence

  // Tile kt's K or V landed (and this thread's wgmma will see it).
  const auto wait_full = [&](uint64_t* full, int kt) {
    const int r = ring0 + kt;
    sm90::mbar_wait(&full[r & 1], (r >> 1) & 1);
    // FP16: the producer's cp.async (generic-proxy) writes -> this thread's wgmma reads. INT4: the
    // producer fenced its own stores before arriving.
    if constexpr (!INT4) sm90::fence_proxy_async();
  };
  const auto release = [&](uint64_t* empty, int kt) {  // this warp is done with tile kt's K or V
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(&empty[(ring0 + kt) & 1]);
  };
  const auto issue_qk = [&](int kt) {  // s = Q·K_ktᵀ
    const uint64_t k_desc = k_desc0 + ((((ring0 + kt) & 1) * kWgTile) >> 4);
    sm90::wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) sm90::wgmma_f16_m64n128_ss(s, q_desc + k_step(ks, kWgQHalf), k_desc + k_step(ks, kWgHalf), ks > 0);
    sm90::wgmma_commit();
  };
  const auto issue_pv = [&](int kt, const uint32_t(&p_kt)[kWgBN / 16][4]) {  // o += P·V_kt
    const uint64_t v_desc = v_desc0 + ((((ring0 + kt) & 1) * kWgTile) >> 4);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kWgBN / 16; ++kk) sm90::wgmma_f16_m64n128_rs_bt(o, p_kt[kk], v_desc + ((kk * 16 * 128) >> 4));
    sm90::wgmma_commit();
  };
  // Scores of tile kt (in s) -> exp2 weights, the running max and sums moved on; returns the
  // factors of the outputs.
  const auto softmax = [&](int kt) {
    // Masked and maxed unscaled; the scale goes into the exponent's FFMA. The mask as a (uniform)
    // branch around two instances: with a runtime flag the compiler predicates a compare and a
    // select onto every score of every tile, ~160 instructions a tile where none is needed.
    const bool need_mask = kt * kWgBN + kWgBN - 1 > context + q0 + wg_row0;
    const float2 mx = need_mask ? scale_mask_max(s, 1.0f, true, kt * kWgBN, t, pos_g, pos_g8)
                                : scale_mask_max(s, 1.0f, false, kt * kWgBN, t, pos_g, pos_g8);
    return softmax_exp_step(s, mx.x, mx.y, m_g, m_g8, l_g, l_g8, p.scale_log2);
  };
  // P in place as the k16 A fragments: keys 16kk.. are accumulator column blocks 2kk, 2kk + 1.
  const auto pack_p = [&](uint32_t(&p_kt)[kWgBN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < kWgBN / 16; ++kk) {
      p_kt[kk][0] = pack_half2(s[2 * kk][0], s[2 * kk][1]);
      p_kt[kk][1] = pack_half2(s[2 * kk][2], s[2 * kk][3]);
      p_kt[kk][2] = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      p_kt[kk][3] = pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  };

  // Slot kt = 0..n_tiles issues Q·K(kt) if kt < n_wg and P·V(kt - 1) if 0 < kt <= n_wg back to
  // back (FlashAttention-3's intra-warpgroup overlap); tiles after this warpgroup's rows are waited
  // for and released unread. P·V(kt - 1) is waited for only in slot kt + 1, after Q·K(kt + 1) is
  // issued and before O is rescaled: between its issue and that wait, slot kt touches neither O nor
  // P's buffer (kt - 1) & 1, so the exponentials of tile kt run under it (with one P buffer and the
  // wait in the same slot, ptxas put the wait above the exponentials). The kinds of slot are
  // separate functions (first: Q·K only, middle: both, last: P·V only, idle), the middle and last
  // ones instantiated per P buffer: every wgmma issue, commit and wait is in straight-line code
  // with no condition around it that ptxas could take for divergent, and no register array is
  // indexed at run time. PINGPONG: the two warpgroups take turns to issue (named barriers 4 + cw:
  // warpgroup cw waits for its turn on its own, passes it on the other's), so one's softmax
  // overlaps the other's GEMMs. Both run n_tiles + 1 slots; warpgroup 0 starts, and warpgroup 1
  // passes no turn after its last slot, so every barrier phase has 256 threads.
  const auto pass_turn = [&](int kt) {
    if (PINGPONG && !(cw == 1 && kt == n_tiles)) sm90::named_barrier_arrive(5 - cw, 256);
  };
  const auto first_slot = [&] {
    wait_full(full_k, 0);
    if constexpr (PINGPONG) sm90::named_barrier_sync(4 + cw, 256);
    issue_qk(0);
    pass_turn(0);
    sm90::wgmma_wait<0>();
    sm90::fence_regs(reinterpret_cast<float(&)[kWgBN / 2]>(s));
    release(empty_k, 0);
    al = softmax(0);
    pack_p(pa[0]);
  };
  // P·V(kt - 2) done (the group before Q·K(kt)), V(kt - 2) released, O times tile kt - 1's factors
  // (FlashAttention-3's place: under Q·K(kt)), then P·V(kt - 1) issued from buffer B.
  const auto accumulate = [&](int kt, auto b_tag) {
    constexpr int B = decltype(b_tag)::value;
    sm90::fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
    if (kt >= 2) release(empty_v, kt - 2);
    rescale_rows(o, al);
    wait_full(full_v, kt - 1);
    issue_pv(kt - 1, pa[B]);
    pass_turn(kt);
  };
  // 0 < kt < n_wg; tile kt - 1's P is in buffer B, tile kt's goes to 1 - B.
  const auto middle_slot = [&](int kt, auto b_tag) {
    constexpr int B = decltype(b_tag)::value;
    wait_full(full_k, kt);
    if constexpr (PINGPONG) sm90::named_barrier_sync(4 + cw, 256);
    issue_qk(kt);
    sm90::wgmma_wait<1>();  // P·V(kt - 2) (groups complete in order; Q·K(kt) may still run)
    accumulate(kt, b_tag);
    sm90::wgmma_wait<1>();  // Q·K(kt); P·V(kt - 1) still runs
    sm90::fence_regs(reinterpret_cast<float(&)[kWgBN / 2]>(s));
    release(empty_k, kt);
    al = softmax(kt);
    pack_p(pa[1 - B]);
  };
  // kt = n_wg: P·V(kt - 1) from buffer B, then O final for the tiles of this warpgroup.
  const auto last_slot = [&](int kt, auto b_tag) {
    if (kt < n_tiles) wait_full(full_k, kt);
    if constexpr (PINGPONG) sm90::named_barrier_sync(4 + cw, 256);
    sm90::wgmma_wait<0>();  // P·V(kt - 2)
    accumulate(kt, b_tag);
    sm90::wgmma_wait<0>();
    sm90::fence_regs(reinterpret_cast<float(&)[D / 2]>(o));
    if (kt < n_tiles) release(empty_k, kt);
    release(empty_v, kt - 1);
  };
  const auto idle_slot = [&](int kt) {  // tiles past this warpgroup's rows: waited for and released
    if (kt < n_tiles) wait_full(full_k, kt);
    if constexpr (PINGPONG) sm90::named_barrier_sync(4 + cw, 256);
    if (kt > 0) wait_full(full_v, kt - 1);
    pass_turn(kt);
    if (kt < n_tiles) release(empty_k, kt);
    if (kt > 0) release(empty_v, kt - 1);
  };
  using B0 = std::integral_constant<int, 0>;
  using B1 = std::integral_constant<int, 1>;
  for (int n = 0; start_item(n); ++n) {
    q_desc = q_desc0 + (((n & 1) * kWgQ) >> 4);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0;
    m_g = m_g8 = -INFINITY;
    l_g = l_g8 = 0;
    pos_g = context + q0 + row_g;
    pos_g8 = pos_g + 8;
    // Tiles [0, n_wg) hold keys some valid row of this warpgroup sees; the later ones (none at all
    // when it has no valid row) are only released.
    const int wg_last_pos = wg_row0 < rows ? context + q0 + min(wg_row0 + 63, rows - 1) : -1;
    const int n_wg = wg_last_pos < 0 ? 0 : min(n_tiles, wg_last_pos / kWgBN + 1);
    sm90::mbar_wait(&q_full[n & 1], (n >> 1) & 1);
    sm90::fence_proxy_async();  // the producer's cp.async (generic-proxy) writes -> wgmma reads

    if (PINGPONG && cw == 1) sm90::named_barrier_arrive(4, 256);
    int kt = 0;
    if (n_wg > 0) {
      first_slot();
      // Unrolled by two: tile kt's P buffer kt & 1 is a compile-time index in each instance.
      for (kt = 1;; ++kt) {
        if (kt == n_wg) {
          last_slot(kt++, B0{});
          break;
        }
        middle_slot(kt++, B0{});
        if (kt == n_wg) {
          last_slot(kt++, B1{});
          break;
        }
        middle_slot(kt, B1{});
      }
    }
    for (; kt <= n_tiles; ++kt) idle_slot(kt);
    __syncwarp();  // this warp's wgmma that read Q are complete (their waits are in the slots)
    if (lane == 0) sm90::mbar_arrive(&q_empty[n & 1]);

#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      l_g += __shfl_xor_sync(0xffffffffu, l_g, off);
      l_g8 += __shfl_xor_sync(0xffffffffu, l_g8, off);
    }
    const float inv_g = 1.0f / l_g, inv_g8 = 1.0f / l_g8;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      if (row_g < rows)
        *reinterpret_cast<uint32_t*>(p.out + (int64_t(tok_base + q0 + row_g) * p.H + h) * D + nt * 8 + 2 * t) =
            pack_half2(o[nt][0] * inv_g, o[nt][1] * inv_g);
      if (row_g + 8 < rows)
        *reinterpret_cast<uint32_t*>(p.out + (int64_t(tok_base + q0 + row_g + 8) * p.H + h) * D + nt * 8 + 2 * t) =
            pack_half2(o[nt][2] * inv_g8, o[nt][3] * inv_g8);
    }
    ring0 += n_tiles;
  }
}

template <bool INT4, bool PINGPONG>
void launch_prefill_wgmma(const KVCacheView& c, const AttentionBatch& b, const PrefillParams& p, Stream stream) {
  constexpr int smem = wg_smem<INT4>();
  const auto kernel = prefill_wgmma_kernel<INT4, PINGPONG>;
  static bool configured = false;
  if (!configured) {
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    configured = true;
  }
  // Persistent: one block per SM (shared memory allows no second), none idle.
  int device = 0, sms = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  kernel<<<std::min(b.num_tiles * p.H, sms), kWgThreads<INT4>, smem, stream>>>(c, b, p);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace

const char* prefill_path_name(PrefillPath p) {
  switch (p) {
    case PrefillPath::Auto: return "auto";
    case PrefillPath::MmaSync: return "mma.sync";
    case PrefillPath::Wgmma: return "wgmma";
    case PrefillPath::WgmmaPingPong: return "wgmma-pingpong";
  }
  return "?";
}

bool prefill_wgmma_applies(const KVCacheView& c, bool k_before_rope) {
  return c.head_dim == kWgD && !k_before_rope;
}

void attention_append(const KVCacheView& c, const AttentionBatch& b, const AppendArgs& a, Stream stream) {
  require(a.num_heads > 0 && a.num_heads % c.kv_heads == 0, "attention_append",
          "{} query heads are not a multiple of {} KV heads", a.num_heads, c.kv_heads);
  require(!a.rope || (a.rope->half_dim() * 2 == c.head_dim && b.max_seq_len <= a.rope->max_positions()),
          "attention_append", "RoPE table ({} positions, dim {}) does not cover {} positions of dim {}",
          a.rope ? a.rope->max_positions() : 0, a.rope ? 2 * a.rope->half_dim() : 0, b.max_seq_len, c.head_dim);
  require(!a.hadamard || !a.k_before_rope, "attention_append",
          "a Hadamard-rotated KV cache needs K stored after RoPE");
  if (b.num_tokens == 0) return;
  AppendParams p{a.qkv,    a.qkv_stride, a.num_heads, c.kv_heads, a.layer, a.rope ? a.rope->data() : nullptr,
                 !a.k_before_rope, a.clip, a.hadamard, a.q_out};
  const dim3 grid(b.num_tokens, (a.num_heads + 2 * c.kv_heads + 3) / 4);
  const bool int4 = c.dtype == KVDtype::Int4;
  if (c.head_dim == 128) {
    if (int4) append_kernel<128, true><<<grid, 128, 0, stream>>>(c, b, p);
    else append_kernel<128, false><<<grid, 128, 0, stream>>>(c, b, p);
  } else {
    if (int4) append_kernel<64, true><<<grid, 128, 0, stream>>>(c, b, p);
    else append_kernel<64, false><<<grid, 128, 0, stream>>>(c, b, p);
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void attention_prefill(const KVCacheView& c, const AttentionBatch& b, const AttentionArgs& a, Stream stream) {
  require(a.num_heads > 0 && a.num_heads % c.kv_heads == 0, "attention_prefill",
          "{} query heads are not a multiple of {} KV heads", a.num_heads, c.kv_heads);
  require(!a.k_before_rope || (a.rope && a.rope->half_dim() * 2 == c.head_dim &&
                               b.max_seq_len <= a.rope->max_positions()),
          "attention_prefill", "K stored before RoPE needs a RoPE table covering {} positions", b.max_seq_len);
  if (b.num_tiles == 0) return;
  const float scale = a.softmax_scale > 0 ? a.softmax_scale : 1.0f / std::sqrt(float(c.head_dim));
  PrefillParams p{a.q, a.out, a.num_heads, a.num_heads / c.kv_heads, a.layer,
                  a.k_before_rope ? a.rope->data() : nullptr, scale * kLog2e};
  const bool wgmma_applies = prefill_wgmma_applies(c, a.k_before_rope);
  const bool forced_wgmma = a.prefill_path == PrefillPath::Wgmma || a.prefill_path == PrefillPath::WgmmaPingPong;
  require(!forced_wgmma || wgmma_applies, "attention_prefill",
          "the wgmma path needs head dim 128 and K stored after RoPE (head dim {}{})", c.head_dim,
          a.k_before_rope ? ", K before RoPE" : "");
  if (a.prefill_path != PrefillPath::MmaSync && wgmma_applies) {
    const bool int4 = c.dtype == KVDtype::Int4;
    if (a.prefill_path == PrefillPath::WgmmaPingPong) {
      if (int4) launch_prefill_wgmma<true, true>(c, b, p, stream);
      else launch_prefill_wgmma<false, true>(c, b, p, stream);
    } else {
      if (int4) launch_prefill_wgmma<true, false>(c, b, p, stream);
      else launch_prefill_wgmma<false, false>(c, b, p, stream);
    }
    return;
  }
  const bool int4 = c.dtype == KVDtype::Int4, rk = a.k_before_rope;
#define NIBBLE_PREFILL(D)                                               \
  if (int4) {                                                           \
    if (rk) launch_prefill<D, true, true>(c, b, p, stream);             \
    else launch_prefill<D, true, false>(c, b, p, stream);               \
  } else {                                                              \
    if (rk) launch_prefill<D, false, true>(c, b, p, stream);            \
    else launch_prefill<D, false, false>(c, b, p, stream);              \
  }
  if (c.head_dim == 128) {
    NIBBLE_PREFILL(128)
  } else {
    NIBBLE_PREFILL(64)
  }
#undef NIBBLE_PREFILL
}

}  // namespace nibble::cuda
