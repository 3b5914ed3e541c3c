// Atom's ablation ladder (Table 4 of the paper): from naive W4A4 RTN, each step adds one part of
// the method, ending at the full recipe with a 4-bit KV cache.
#pragma once

#include <string>
#include <vector>

#include "nibble/quant/recipe.h"

namespace nibble::quant {

struct AblationStep {
  std::string label;
  Recipe recipe;
};

// `group` and `keeper` are Atom's 128/128 unless scaled down for a narrow model; with
// `atom_compat` every step uses Atom's released-code choices (Recipe::apply_atom_compat), and the
// ladder starts with Atom's FP16 row (the unquantized model with fp16 activations).
std::vector<AblationStep> atom_ladder(int group, int64_t keeper, bool atom_compat, int64_t calib_windows,
                                      int64_t calib_ctx, uint64_t seed);

}  // namespace nibble::quant
