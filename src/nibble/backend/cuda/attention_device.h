// Device helpers of the attention kernels (include from .cu files only): ldmatrix,
// mma.sync m16n8k16 (fp16 in, fp32 accumulate), INT4 -> fp16 pairs, block addressing.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "nibble/backend/cuda/attention_common.h"
#include "nibble/backend/cuda/cp_async.cuh"
#include "nibble/backend/cuda/half_pack.cuh"

namespace nibble::cuda::attn {

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// D += A·B, A 16x16 (row), B 16x8 (col), fp16 in, fp32 accumulate. Fragment layouts (lane = 4g + t):
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B: b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   C: c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<const uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<const __half2*>(&u); }

// The fp16 pair (1024 + code_a, 1024 + code_b) of nibbles i and i + 4 of `word`: in the page's
// nibble order these are dims (2i, 2i+1) of the word's 8 dims. Exact; subtract 1024 + zero next.
__device__ __forceinline__ uint32_t nibble_pair_1024(uint32_t word, int i) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(word >> (4 * i)), "r"(0x000F000Fu), "r"(0x64006400u));
  return r;  // (a & b) | c
}

// Dequantized fp16 pair of nibbles i, i+4: fp16((code - zero) · scale) for each, where
// zz = (1024 + zero) twice and ss = scale twice (half2). (code - zero) is exact, the product is
// rounded once: equal to fp16(format.h int_asym_decode).
__device__ __forceinline__ __half2 dequant_pair(uint32_t word, int i, __half2 zz, __half2 ss) {
  return __hmul2(__hsub2(u2h(nibble_pair_1024(word, i)), zz), ss);
}

// An INT4 word's 8 dims (page nibble order: nibbles i, i + 4 are dims 2i, 2i + 1) as 4 fp16 pairs,
// {dequant_pair(word, 0..3)} with the same values, in fewer instructions: pairs 0 and 2 as in
// nibble_pair_1024 (1024 + code, minus 1024 + zero: code - zero exactly); pairs 1 and 3 masked in
// place, 1024 + 16 code (exact), brought to code - zero by one HFMA2, x / 16 - (64 + zero), whose
// exact result is representable so its one rounding changes nothing; one shift serves two pairs.
// Then the same single-rounding product with the scale. zero: 0..63 (the format's 0..15).
__device__ __forceinline__ uint4 dequant_word(uint32_t word, uint32_t zero, __half2 ss) {
  const uint32_t zero2 = zero * 0x00010001u;
  const __half2 zz = u2h(0x64006400u | zero2), zz16 = u2h(0x54005400u | (zero2 << 4));  // 1024 + z, 64 + z
  const __half2 sixteenth = __float2half2_rn(0.0625f);
  uint32_t even[2], odd[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const uint32_t w = word >> (8 * k);
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(even[k]) : "r"(w), "r"(0x000F000Fu), "r"(0x64006400u));
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(odd[k]) : "r"(w), "r"(0x00F000F0u), "r"(0x64006400u));
  }
  return make_uint4(h2u(__hmul2(__hsub2(u2h(even[0]), zz), ss)),
                    h2u(__hmul2(__hfma2(u2h(odd[0]), sixteenth, __hneg2(zz16)), ss)),
                    h2u(__hmul2(__hsub2(u2h(even[1]), zz), ss)),
                    h2u(__hmul2(__hfma2(u2h(odd[1]), sixteenth, __hneg2(zz16)), ss)));
}

// 2^x in one MUFU.EX2, denormal results flushed to 0 (exp2f adds a range check and two multiplies
// per call). Softmax arguments are <= 0 after the max is subtracted; a flushed tiny weight is 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The running maxima m0, m1 of two softmax rows move to include a step's maxima mx0, mx1 (each
// lane's own, reduced here over the lanes lane ^ FIRST .. lane ^ LAST that share the row); returns
// the rescale factors 2^(scale · (old - new)) of the rows' sums and outputs (scale: see
// softmax_exp_step).
template <int FIRST, int LAST>
__device__ __forceinline__ float2 softmax_new_max(float mx0, float mx1, float& m0, float& m1, float scale = 1.0f) {
#pragma unroll
  for (int off = FIRST; off <= LAST; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
  const float2 al = make_float2(fast_exp2((m0 - mn0) * scale), fast_exp2((m1 - mn1) * scale));
  m0 = mn0;
  m1 = mn1;
  return al;
}

// The exponential half of an online-softmax step for the two query rows a lane holds in m16n8
// accumulator fragments (elements 0, 1: row g; 2, 3: row g + 8; the 4 lanes of a quad share the
// rows). s: NJ fragments of scores, scale · s in the log2 domain, masked keys at -inf, turned into
// exp2(scale · (s - new row max)); mx_g, mx_g8: the lane's own maxima of them (the caller takes
// them while it masks). The running max m (of s, unscaled) and sum l move on; returns the factors
// the rows' outputs must be rescaled by (rescale_rows) before this step's P·V is added. A scale
// other than 1 is folded into the subtraction, one FFMA an element (FlashAttention's way); scale 1
// (scores scaled by the caller) computes exactly s - max as before.
template <int NJ>
__device__ __forceinline__ float2 softmax_exp_step(float (&s)[NJ][4], float mx_g, float mx_g8, float& m_g,
                                                   float& m_g8, float& l_g, float& l_g8, float scale = 1.0f) {
  const float2 al = softmax_new_max<1, 2>(mx_g, mx_g8, m_g, m_g8, scale);
  l_g *= al.x;
  l_g8 *= al.y;
  const float ms_g = m_g * scale, ms_g8 = m_g8 * scale;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    s[j][0] = fast_exp2(fmaf(s[j][0], scale, -ms_g));
    s[j][1] = fast_exp2(fmaf(s[j][1], scale, -ms_g));
    s[j][2] = fast_exp2(fmaf(s[j][2], scale, -ms_g8));
    s[j][3] = fast_exp2(fmaf(s[j][3], scale, -ms_g8));
    l_g += s[j][0] + s[j][1];
    l_g8 += s[j][2] + s[j][3];
  }
  return al;
}

// Output accumulators o (m16n8 fragments) times the rows' factors al; skipped while no row max moves.
template <int NO>
__device__ __forceinline__ void rescale_rows(float (&o)[NO][4], float2 al) {
  if (__any_sync(0xffffffffu, al.x != 1.0f || al.y != 1.0f)) {
#pragma unroll
    for (int i = 0; i < NO; ++i) {
      o[i][0] *= al.x;
      o[i][1] *= al.x;
      o[i][2] *= al.y;
      o[i][3] *= al.y;
    }
  }
}

// One online-softmax step (softmax_exp_step, then rescale_rows of the outputs).
template <int NJ, int NO>
__device__ __forceinline__ void online_softmax_step(float (&s)[NJ][4], float (&o)[NO][4], float mx_g, float mx_g8,
                                                    float& m_g, float& m_g8, float& l_g, float& l_g8) {
  rescale_rows(o, softmax_exp_step(s, mx_g, mx_g8, m_g, m_g8, l_g, l_g8));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ const uint8_t* block_ptr(const KVCacheView& c, int layer, int page, int kvh) {
  return c.pool + ((int64_t(layer) * c.num_pages + page) * c.kv_heads + kvh) * c.block_bytes;
}

}  // namespace nibble::cuda::attn
