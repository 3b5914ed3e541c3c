// Command-line knobs of a quantization recipe, shared by `nibble quantize` and `nibble ablate`.
#pragma once

#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "nibble/quant/recipe.h"
#include "tools/commands.h"

namespace nibble::cli {

struct RecipeOptions {
  std::string recipe = "atom-w4a4";
  std::optional<std::string> w_format, a_format, keeper_precision, sort_metric, kv_rotation, residual_rotation;
  std::optional<int> group, w_group, a_group, w_row_group;
  std::optional<float> w_clip, a_clip;
  KVOverride kv;
  std::optional<int64_t> keeper, calib_windows, calib_ctx;
  std::vector<int64_t> keeper_by_slot;
  std::optional<double> percdamp;
  std::optional<double> smooth_alpha, k_smooth_alpha;
  std::optional<uint64_t> seed;
  std::optional<bool> gptq, reorder, hessian_fp, clip_search, clip_by_gptq_loss, group_hadamard, act_order;
  bool atom_compat = false;

  // `with_preset`: the --recipe option too (ablate builds its own ladder).
  void add_to(CLI::App* cmd, bool with_preset);
  // The preset with every given knob applied on top.
  quant::Recipe build() const;
  // Applies the knobs (not the preset name) to `r`.
  void apply(quant::Recipe& r) const;
};

}  // namespace nibble::cli
