// GPTQ (Frantar et al., 2022): quantize a weight column by column in the permuted (Atom) order,
// spreading each column's rounding error over the columns not yet quantized through the inverse
// Hessian of the layer's inputs. Float64 throughout, Cholesky from LAPACK (or cuSOLVER), lazy batch updates.
// No act-order: Atom's reordering takes its place. Keeper columns (the last `keeper`) take part
// in the compensation and are then stored at their own precision.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "nibble/quant/quant_linear.h"

namespace nibble::quant {

struct GptqOptions {
  int64_t block = 128;     // columns per lazy batch
  double percdamp = 0.01;  // damping: percdamp · mean(diag H) added to the diagonal
  // Per group (and row group): the clip ratio in {1, 0.95, ..., 0.5} whose rounding error,
  // weighted by diag(H) (each input channel's energy), is smallest, instead of the fixed clip.
  bool clip_search = false;
  // The clip search scores each trial by GPTQ's own loss of the group, Σ (w - q)² / d² with every
  // column's error spread over the group's later columns (the output error the column loop will
  // really leave, through the conditioned Hessian), instead of diag(H) times the rounding error.
  // CPU only: the device column loop refuses it.
  bool clip_by_gptq_loss = false;
  // All of it on the CUDA device (quant/device_math.h): the factorisation (cuSOLVER), the column
  // loop (one warp per row group) and the lazy batch updates (cuBLAS DGEMM). The column loop's
  // arithmetic is the host's, operation for operation: the same codes but for rounding ties (the
  // factor's and the DGEMM's last bits).
  bool on_device = false;
};

struct GptqResult {
  QuantizedMatrix main;                    // [N, K - keeper]
  std::optional<QuantizedMatrix> keepers;  // [N, keeper] at INT8/FP8
  std::vector<uint16_t> keeper_fp16;       // or fp16 bits
  double loss = 0;                         // Σ (w - q)² / d², GPTQ's own error measure
};

// W: [N, K] row-major, channels already permuted. xtx: XᵀX [K, K] of the inputs in the same order
// (taken by value: a caller done with it moves it in, and GPTQ factors it in place).
GptqResult gptq_quantize(const std::vector<float>& W, int64_t N, int64_t K, std::vector<double> xtx,
                         const LinearQuantSpec& spec, const GptqOptions& opt, const std::string& where);

// Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), row-major [K, K], after GPTQ's dead-channel and
// damping treatment of H: what the column loop reads. Exposed for tests.
std::vector<double> gptq_inverse_hessian_factor(std::vector<double> H, int64_t K, double percdamp,
                                                std::vector<char>* dead, const std::string& where,
                                                bool on_device = false);

}  // namespace nibble::quant
