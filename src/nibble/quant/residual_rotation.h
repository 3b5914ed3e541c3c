// The residual-stream rotation of QuaRot and SpinQuant (their R1, not learned): an orthogonal R
// [hidden, hidden] with the stream carried as x' = Rᵀx. Every RMSNorm weight is first folded into the
// linears that read the normed stream (q/k/v and the router/gate/up, the LM head), so the norms are
// 1 and commute with R (‖Rᵀx‖ = ‖x‖); then readers W := W·R, writers (o_proj, down_proj) W := Rᵀ·W,
// embedding rows e := Rᵀ·e. The FP network is the same function in another basis, folded offline:
// zero run-time cost, both runtimes run it unchanged. What it changes is what the quantizers see:
// the residual's outlier channels spread over all channels.
#pragma once

#include <cstdint>
#include <vector>

#include "nibble/model/model.h"
#include "nibble/quant/recipe.h"

namespace nibble::quant {

// Whether a Hadamard matrix of order n is built here: 2^k, or (q + 1)·2^k for a prime q ≡ 3 mod 4
// (Paley's construction ⊗ Walsh-Hadamard; 768 = 12·64, 5120 = 20·256).
bool has_hadamard(int64_t n);

// R [n, n] row-major, orthogonal. Hadamard: diag(s)·H/√n with s random ±1 (QuaRot's randomized
// Hadamard; H as has_hadamard); Random: the Q of a QR of a Gaussian matrix, signs fixed so that it
// is Haar-distributed. Deterministic in `seed`, on every platform (own Gaussian, no std distribution).
std::vector<double> residual_rotation_matrix(ResidualRotation kind, int64_t n, uint64_t seed);

// Folds layer l's two RMSNorm weights into their readers and rotates its linears (all still
// DenseLinear): q/k/v, router and gate/up W := W·diag(g)·R; o_proj and down_proj W := Rᵀ·W, bias Rᵀ·b.
void rotate_layer_residual(Layer& layer, const std::vector<double>& r);

// The outer tensors, rounded to fp16 (the width the checkpoint held them at and the CUDA executor
// uploads; the packed file stores exactly these values): embedding [vocab, hidden] rows Rᵀ·e, and the
// LM head [vocab, hidden] W·diag(final_norm)·R. A tied model's head is the embedding before rotation;
// after it the two differ (the final norm is folded into one of them only), so the model is untied.
std::vector<float> rotate_embedding(std::vector<float> embedding, const std::vector<double>& r);
std::vector<float> rotate_lm_head(std::vector<float> head, const std::vector<float>& final_norm,
                                  const std::vector<double>& r);

// The whole model in memory: every layer, the embedding and LM head, the final norm := 1, untied.
void rotate_model_residual(Model& model, const std::vector<double>& r);

}  // namespace nibble::quant
