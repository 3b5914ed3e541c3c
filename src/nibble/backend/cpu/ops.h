// CPU reference ops of the forward pass, in fp32. Each reads like the math it computes.
// `fp16`: the op stores its intermediate and final values in fp16 where PyTorch's fp16 model does
// (each elementwise step computed in fp32 and rounded; matmuls accumulate in fp32), as Atom's
// code runs a model (--atom-compat).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "nibble/model/config.h"

namespace nibble::cpu {

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for `rows` rows of length n.
void rms_norm(const float* x, const float* weight, int64_t rows, int64_t n, double eps, float* out,
              bool fp16 = false);

// RoPE inverse frequencies theta^(-2i/d), i < d/2, with llama3 scaling when configured.
std::vector<double> rope_inv_freq(const ModelConfig& c);

// Rotates `heads` consecutive head vectors of x (rotate-half layout, as Hugging Face) by the
// angles of position `pos`; x has heads * head_dim floats.
void apply_rope(float* x, int64_t heads, int64_t head_dim, int64_t pos, std::span<const double> inv_freq,
                bool fp16 = false);

// Causal GQA attention for one sequence. q: [n, heads*d] for positions start..start+n-1;
// k, v: [start+n, kv_heads*d] (all positions); out: [n, heads*d]. sliding_window 0 = none.
void attention(const float* q, const float* k, const float* v, int64_t n, int64_t start, int64_t heads,
               int64_t kv_heads, int64_t d, int64_t sliding_window, float* out, bool fp16 = false);

// SwiGLU: out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i].
void swiglu(const float* gate_up, int64_t rows, int64_t inter, float* out, bool fp16 = false);

// y[M, N] = x[M, K] · w[N, K]ᵀ + beta · y, all row-major and contiguous. Row i of y is a function of
// row i of x alone, bit for bit, whatever M, the row's place and the thread count: the forward
// pass of a sequence then gives the same logits alone and in any batch, in any prefill chunks.
// (OpenBLAS sums a row differently for 1 row than for 5, and by its thread count.)
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* x, const float* w, float beta, float* y);

// The upper triangle (j >= i) of xᵀx [dim, dim] for x [rows, dim]; the lower triangle is not written.
// Through single-threaded BLAS in fixed tiles, the tiles in parallel: the order of the sums
// depends on the shapes alone, not on the thread count.
void gram_upper(const float* x, int64_t rows, int64_t dim, float* out);

// In-place softmax over n values.
void softmax(float* x, int64_t n);

float dot(const float* a, const float* b, int64_t n);

}  // namespace nibble::cpu
