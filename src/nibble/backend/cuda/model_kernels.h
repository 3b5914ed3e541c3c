// The elementwise steps of the forward pass on the GPU, each the CUDA twin of a backend/cpu/ops.h
// function (same math in fp32; fp16 where a tensor is stored in fp16). The residual stream stays
// fp32 so that the FP16 path differs from the CPU reference only by fp16 weights and linear inputs.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nibble::cuda {

// h[i, :] = float(table[tokens[i] - first, :]) for n tokens of width H; 0 for a token outside the
// table's rows first..first+table_rows-1 (a tensor-parallel rank's vocabulary slice).
void embed_rows(const int32_t* tokens, int64_t n, const __half* table, int64_t first, int64_t table_rows, int64_t H,
                float* h, cudaStream_t stream);

// out[r, c] = parts[c / width][r, c % width] for c < cols: row-major [rows, width] blocks, one per rank,
// one after another (an NCCL all-gather's result) as the columns of one [rows, cols] matrix.
void rank_columns(const float* parts, int64_t rows, int64_t width, int64_t cols, float* out,
                  cudaStream_t stream);
void rank_columns(const __half* parts, int64_t rows, int64_t width, int64_t cols, __half* out,
                  cudaStream_t stream);

// For each of `rows` rows: h += y (when y is not null), then out = rms_norm(h) · w in fp16
// (cpu::rms_norm: x / sqrt(mean(x²) + eps) · w) when out is not null, and h16 = fp16(h) when h16
// is not null (the input of the fused W4A4 norm/quantize kernels).
void residual_rmsnorm(float* h, const __half* y, int64_t rows, int64_t H, const float* w, float eps, __half* out,
                      __half* h16, cudaStream_t stream);

// out[r, i] = silu(gu[r, i]) · gu[r, I + i] (cpu::swiglu), fp16 in and out.
void swiglu(const __half* gu, int64_t rows, int64_t I, __half* out, cudaStream_t stream);

// y[r, :] += b (fp16, added in fp32) for rows of width N.
void add_bias(__half* y, const __half* b, int64_t rows, int64_t N, cudaStream_t stream);

// The orthonormal Walsh-Hadamard transform (quant/hadamard.h) of each of `vectors` consecutive
// D-wide vectors, in place (D = 64 or 128): turns a rotated-basis attention output back.
void hadamard_heads(__half* x, int64_t vectors, int D, cudaStream_t stream);

// Mixtral's routing (Model::mlp), in fp32 from the fp32 residual so that a choice between two
// experts flips only where the CPU's would be a near-tie too: per row of h [rows, H], RMSNorm with
// `norm`, scores = router [E, H] · x, softmax, keep the top k (ties to the lower expert, as a stable
// sort), renormalise them to sum to one. weights [rows, E]: each expert's weight, 0 if not chosen.
// E <= kMaxExperts.
constexpr int kMaxExperts = 64;
void moe_route(const float* h, int64_t rows, int64_t H, const float* norm, float eps, const float* router, int E,
               int k, float* weights, cudaStream_t stream);

// h[r, :] += weights[r, e] · y[r, :] (an expert's output into the fp32 residual; rows that did not
// choose expert e add 0).
void add_expert_output(float* h, const __half* y, const float* weights, int E, int e, int64_t rows, int64_t H,
                       cudaStream_t stream);

// out[i, :] = x[idx[i], :] for n rows of width H.
void gather_rows(const __half* x, const int32_t* idx, int64_t n, int64_t H, __half* out, cudaStream_t stream);

// ids[r] = the first maximum of row r of `logits` [rows, V] (std::max_element's choice, the CPU
// sampler's greedy pick); *nonfinite is set to 1 when any value is NaN or infinite (and left
// untouched otherwise: clear it first).
void argmax_rows(const float* logits, int64_t rows, int64_t V, int32_t* ids, int32_t* nonfinite,
                 cudaStream_t stream);

}  // namespace nibble::cuda
