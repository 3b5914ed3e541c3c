// Rotations of the integer KV cache learned on calibration data (SpinQuant's R2 for V, and a
// run-time rotation for K after RoPE), one orthogonal R per (layer, KV head) in place of the
// identity in front of the cache's Walsh-Hadamard quantizer. No autograd: the straight-through
// gradient is written out here and R moves by Cayley steps, so it stays orthogonal.
//
// For a head vector x the cache stores Q(H·R·x) and attention sees e = Rᵀ·Hᵀ·deq(Q(H·R·x)) − x
// as its error (after folding R back: V's Rᵀ into o_proj, K's R into the queries). The loss is the
// mean over samples of eᵀ·M·e: M = the group's E[q·qᵀ] for K (the error of the logits q·k), and
// the Gram matrix of the group's o_proj columns for V (the error of the layer output).
#pragma once

#include <cstdint>
#include <vector>

#include "nibble/model/config.h"
#include "nibble/model/model.h"
#include "nibble/quant/format.h"

namespace nibble::quant {

struct RotationProblem {
  int64_t dim = 0;                    // head_dim, a power of two (the cache's Hadamard)
  std::vector<float> train, heldout;  // [n, dim] head vectors: the loss's samples, and a report's
  std::vector<double> metric;         // M [dim, dim], symmetric positive semi-definite
  FormatSpec spec;                    // the cache's quantizer of one head (kv_format_spec)
};

struct RotationOptions {
  int steps = 150;
  double step = 0.05;  // the first Cayley step's ‖η·A‖_F (A the skew gradient), cosine-decayed to 0
};

struct LearnedRotation {
  std::vector<double> rotation;  // R [dim, dim], row-major, orthogonal
  double train_hadamard = 0, train_learned = 0;      // the loss at R = I and at R, training samples
  double heldout_hadamard = 0, heldout_learned = 0;  // the same on the held-out samples
};

// The loss of R on samples x [n, dim] (the cache's real quantizer).
double rotation_loss(const RotationProblem& p, const std::vector<float>& x, const std::vector<double>& rotation);

// The straight-through estimator at a point: the rounding offsets of the quantized values and the
// clamped elements frozen at `at`, so the surrogate loss is smooth in R and equals rotation_loss at
// `at`. Its gradient is what learning follows; exposed so a test can check it by finite differences.
struct FrozenQuantizer {
  std::vector<float> offset;   // [n, dim] deq(Q(y)) − y at `at` for a passed element, deq(Q(y)) for a clamped one
  std::vector<uint8_t> passes;  // [n, dim] 1: the rounding passes the gradient (the STE), 0: clamped
};
FrozenQuantizer freeze_quantizer(const RotationProblem& p, const std::vector<float>& x, const std::vector<double>& at);
// Loss and ∂loss/∂R of the surrogate with `frozen` (gradient null: the loss only).
double surrogate_loss(const RotationProblem& p, const std::vector<float>& x, const FrozenQuantizer& frozen,
                      const std::vector<double>& rotation, std::vector<double>* gradient);

// Cayley descent from R = I (the cache's plain Hadamard); returns the R of least training loss seen
// (never worse than I on the training samples). Deterministic.
LearnedRotation learn_rotation(const RotationProblem& p, const RotationOptions& opt = {});

// Folds V's rotations [num_kv_heads, dim, dim] into a dense layer: v rows (and bias) := R·v, and
// every query head of group g's o_proj columns := W_o[:, head]·R_gᵀ. The full-precision layer's output
// is unchanged; the cache (and o_proj's input) then see R·v.
void fold_value_rotation(Layer& layer, const ModelConfig& c, const std::vector<double>& rotations);

}  // namespace nibble::quant
