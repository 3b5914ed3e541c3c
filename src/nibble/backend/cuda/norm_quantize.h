// The activation side of gemm_w4a4: one kernel per linear input that reads fp16 activations once
// and writes Atom's packed operand (INT4 groups + fp16 scales, INT8 keepers + a scale per row) in
// the GPU layout of atom_layout.h, with the clip ratios of the simulation (quant/format.h's
// choose_scale + int_sym_encode, called from device code).
//
//   rmsnorm_quantize:  x[j] = w[j] * (h[perm[j]] * inv),  inv = 1 / sqrt(mean(h²) + eps)
//                      (inputs of q/k/v and gate/up; w is the norm weight in permuted order)
//   gather_quantize:   x[j] = a[perm[j]]                  (input of o_proj)
//   swiglu_quantize:   x[j] = silu(g[perm[j]]) * u[perm[j]], silu(v) = v / (1 + exp(-v))
//                      (input of down_proj; perm usually null: gate/up rows carry its order)
// perm may be null (identity). Output channels [0, K-keeper) are quantized Int4Sym per group of
// 128 with clip4, [K-keeper, K) Int8Sym per row with clip8. The arithmetic follows
// backend/cpu/ops.cpp (rms_norm, swiglu) in fp32; rows [M, rows_pad) of the output are zeroed.
// The same codes and scales can instead be written pre-widened in the wgmma B layout (gemm_w4a4.h's
// XInt8Operand), which the GEMM's wgmma path (Auto's from kWgmmaMinM rows) reads without a repack.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "nibble/backend/cuda/atom_layout.h"
#include "nibble/backend/cuda/gemm_w4a4.h"

namespace nibble::cuda {

struct ActQuant {
  float clip4 = 0.9f;  // Atom's activation clip ratio
  float clip8 = 1.0f;  // keepers
  // Quantize each INT4 group in a Walsh-Hadamard-rotated basis (quant::LinearQuantSpec's
  // group_hadamard: the weights were stored as W·Hᵀ, so the product is unchanged).
  bool hadamard = false;
};

// Where the quantized rows go: Atom's packed operand (atom_layout.h; every GEMM path reads it), or
// X pre-widened (gemm_w4a4.h; rows up to the 128-token tile zeroed, a keeper slab's upper half too).
struct ActOutput {
  AtomOperandMut packed;      // its shape is the output's either way; q and s unused when pre-widened
  uint8_t* x_int8 = nullptr;  // set: the pre-widened blocks, gemm_w4a4_x_int8_bytes(rows, K, keeper), 16-byte aligned
  ActOutput(const AtomOperandMut& p) : packed(p) {}  // implicit: the packed layout, as before
  static ActOutput pre_widened(uint8_t* blocks, const AtomShape& shape) {
    ActOutput o(AtomOperandMut{nullptr, nullptr, shape});
    o.x_int8 = blocks;
    return o;
  }
  XInt8Operand x_int8_operand() const { return {x_int8, packed.shape}; }
};

// `out`'s shape must be atom_shape(M, K, keeper). ld_*: elements between rows of the input.
void rmsnorm_quantize(const __half* h, int64_t ld_h, const int32_t* perm, const float* norm_w, float eps,
                      const ActOutput& out, ActQuant q, cudaStream_t stream);
// rmsnorm_quantize with the residual add in front, one launch instead of two: h += y (fp32; y fp16
// or null: nothing added, h untouched), then rmsnorm_quantize of fp16(h) — the same bytes in `out`
// and in h as residual_rmsnorm(h, y, rows, K, nullptr, eps, nullptr, h16) followed by
// rmsnorm_quantize(h16, K, ...). h: [rows, K] fp32, ld K, 16-byte aligned (y too). row_counters: at
// least `rows` ints, zero before the call and left zero (the blocks that share a row count their
// arrivals: the last, after all have read h, writes h + y back).
void residual_rmsnorm_quantize(float* h, const __half* y, const int32_t* perm, const float* norm_w, float eps,
                               const ActOutput& out, ActQuant q, int* row_counters, cudaStream_t stream);
void gather_quantize(const __half* a, int64_t ld_a, const int32_t* perm, const ActOutput& out, ActQuant q,
                     cudaStream_t stream);
void swiglu_quantize(const __half* gate, const __half* up, int64_t ld, const int32_t* perm,
                     const ActOutput& out, ActQuant q, cudaStream_t stream);

}  // namespace nibble::cuda
