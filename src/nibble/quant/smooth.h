// SmoothQuant-style scale migration, folded into the layer's weights (zero run-time cost): the
// input channel c of a linear is divided by s_c where the input is produced (the RMSNorm weight
// for q/k/v and gate/up, the up rows of gate/up for down_proj) and the weight column c is
// multiplied by s_c, so the full-precision layer computes the same outputs. Activation outliers
// move partly into the weights before the grouped INT4 quantizers see them.
#pragma once

#include <cstdint>
#include <vector>

#include "nibble/model/model.h"

namespace nibble::quant {

// s_c = rms_c^α / max_n |W[n, c]|^(1-α) (rms_c = sqrt(sum_sq_c / count)), normalised to geometric
// mean 1 over the smoothed channels; s_c = 1 for the `keeper` channels of largest sum_sq (they
// stay at keeper precision) and for channels with no activation or weight.
std::vector<double> smoothing_scales(const std::vector<double>& sum_sq, int64_t count, const std::vector<float>& w,
                                     int64_t N, int64_t K, double alpha, int64_t keeper);

// Folds s into a dense layer: the input of `slot` (QKV, GateUp or Down) becomes x / s and the
// linear's weight columns W[:, c] · s_c. The linears must still be DenseLinear.
void fold_input_scales(Layer& layer, LinearSlot slot, const std::vector<double>& s, int64_t intermediate);

// QServe's SmoothAttention for the INT4 K cache: λ per K channel [kv_dim], λ = rms^α of the
// channel pair RoPE rotates together (i, i + head_dim/2: the pair's energy is what RoPE keeps),
// normalised to geometric mean 1 per head. rms from the q/k/v input's XᵀX [hidden, hidden] over
// `count` rows and the k rows of the fused weight: E[k_r²] = w_rᵀ·XᵀX·w_r / count.
std::vector<double> key_smoothing_scales(const std::vector<double>& xtx, int64_t count, const std::vector<float>& qkv,
                                         const ModelConfig& c, double alpha);

// K channel (g, i) := K / λ and every query head h of group g, channel i := Q · λ (rows and bias of
// the fused q/k/v linear, still dense): q·k, and so attention, is unchanged.
void fold_key_scales(Layer& layer, const ModelConfig& c, const std::vector<double>& lambda);

}  // namespace nibble::quant
