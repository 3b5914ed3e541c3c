// Quantizes a loaded model in place, layer by layer, the Atom way:
//   1. full-precision statistics of every linear's input (reorder metric), from the FP model;
//   2. permutations sorting channels by salience (keepers last), down_proj's folded into the
//      gate/up output rows, the others gathered at run time;
//   3. for GPTQ, XᵀX of each linear's inputs in the quantized model (earlier layers quantized);
//   4. RTN or GPTQ per linear, replaced by a QuantLinear; 5. the quantized layer's output feeds
//   the next layer. Memory: the model plus one layer's statistics and the calibration activations.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "nibble/model/model.h"
#include "nibble/quant/recipe.h"

namespace nibble::quant {

struct QuantizeReport {
  double seconds = 0;
  // Where the time went: calibration passes collecting statistics (the full-precision layer, and
  // with --hessian-quantized the gathered quantized inputs), GPTQ or rounding, and the passes of
  // the quantized layer that feed the next one.
  double stats_seconds = 0, quantize_seconds = 0, advance_seconds = 0;
  int64_t calib_windows = 0, calib_ctx = 0;
  int64_t peak_rss_bytes = 0;
  std::vector<std::string> warnings;
};

QuantizeReport quantize_model(Model& model, const Recipe& recipe, std::span<const int32_t> calib_tokens,
                              const std::string& calib_where, bool show_progress = true);

// Channel order sorting `metric` ascending (stable), so the largest channels come last.
std::vector<int32_t> salience_order(const std::vector<double>& metric);

// GPTQ's Hessian in a linear's channel order: Hp[i][j] = H[order[i]][order[j]] (empty order: H).
// Exposed for tests.
std::vector<double> permute_hessian(const std::vector<double>& H, const std::vector<int32_t>& order);
// H := R·H·R for R the orthonormal Hadamard of each `group`-wide block of the first `main` channels
// (identity on the keepers): the Hessian of group-rotated inputs. Computed in float. Exposed for tests.
void rotate_hessian_groups(std::vector<double>& H, int64_t K, int64_t main, int64_t group);

int64_t peak_rss_bytes();

}  // namespace nibble::quant
