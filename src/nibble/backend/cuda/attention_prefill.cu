// attention_append (RoPE + K/V into the paged cache, INT4 quantization on the fly) and
// attention_prefill (causal GQA flash attention of a ragged batch over its paged cache).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "nibble/backend/cuda/attention_device.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/format_device.cuh"
#include "nibble/backend/cuda/hadamard_device.cuh"

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
constexpr int chunk_bytes() {  // 16 tokens of one block (kv_cache_paged.h)
  return INT4 ? 16 * D + 96 : 64 * D;
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
    float mx_g = -INFINITY, mx_g8 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kt * kBN + j * 8 + 2 * t + (e & 1);
        float v = s[j][e] * p.scale_log2;
        if (need_mask && key > (e < 2 ? pos_g : pos_g8)) v = -INFINITY;
        s[j][e] = v;
        if (e < 2) mx_g = fmaxf(mx_g, v);
        else mx_g8 = fmaxf(mx_g8, v);
      }
    online_softmax_step(s, o, mx_g, mx_g8, m_g, m_g8, l_g, l_g8);
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

}  // namespace

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
