#include "tools/recipe_options.h"

#include "nibble/core/error.h"

namespace nibble::cli {

void RecipeOptions::add_to(CLI::App* cmd, bool with_preset) {
  if (with_preset) {
    std::string names;
    for (const auto& n : quant::Recipe::preset_names()) names += (names.empty() ? "" : ", ") + n;
    cmd->add_option("--recipe", recipe, "preset: " + names)->capture_default_str();
  }
  cmd->add_option("--w-format", w_format, "weight format: int4, int4-atom-gptq, int8, fp4, mxfp4, nvfp4");
  cmd->add_option("--a-format", a_format, "activation format (same names)");
  cmd->add_option("--group", group, "group size along K for weights and activations (0 = whole row)");
  cmd->add_option("--w-group", w_group, "weight group size");
  cmd->add_option("--a-group", a_group, "activation group size");
  cmd->add_option("--w-row-group", w_row_group, "adjacent output rows sharing a weight scale (Atom's --weight_channel_group)");
  // The defaults quoted from the preset itself, so the help cannot drift from it.
  const quant::Recipe atom = quant::Recipe::preset("atom-w4a4");
  cmd->add_option("--w-clip", w_clip, fmt::format("weight clip ratio (atom-w4a4: {})", atom.weight.clip));
  cmd->add_option("--a-clip", a_clip, fmt::format("activation clip ratio (atom-w4a4: {})", atom.act.clip));
  cmd->add_option("--keeper", keeper, fmt::format("outlier channels kept at keeper precision (atom-w4a4: {})", atom.keeper));
  cmd->add_option("--keeper-by-slot", keeper_by_slot,
                  "keepers of q/k/v, o_proj, gate/up, down_proj in place of --keeper (4 counts, comma separated)")
      ->delimiter(',')
      ->expected(4);
  cmd->add_option("--keeper-precision", keeper_precision, "fp16, int8, fp8-e4m3, fp8-e5m2 (or Atom's 0..3)");
  cmd->add_option("--act-sort-metric", sort_metric, "reorder metric: hessian (sum of x^2) or abs_mean");
  // Tri-state switches: absent keeps the preset's choice.
  auto tri = [cmd](const std::string& on, const std::string& off, std::optional<bool>* v, const std::string& help) {
    cmd->add_flag_callback(on, [v] { *v = true; }, help);
    cmd->add_flag_callback(off, [v] { *v = false; }, "the opposite of " + on);
  };
  tri("--gptq", "--no-gptq", &gptq, "quantize weights with GPTQ (else round to nearest)");
  tri("--w-clip-search", "--no-w-clip-search", &clip_search,
      "GPTQ: per-group weight clip minimising the Hessian-weighted error (beyond Atom; overrides --w-clip)");
  tri("--w-clip-gptq-loss", "--no-w-clip-gptq-loss", &clip_by_gptq_loss,
      "the clip search scores each clip by GPTQ's loss of the group (error after compensation) instead of diag(H) "
      "times the rounding error (CPU only)");
  tri("--group-hadamard", "--no-group-hadamard", &group_hadamard,
      "quantize each group of weights and activations in a Hadamard-rotated basis (exact; beyond Atom)");
  tri("--reorder", "--no-reorder", &reorder, "permute input channels by salience (keepers last)");
  tri("--act-order", "--no-act-order", &act_order,
      "GPTQ act-order: the INT4 channels stored and quantized most salient first (keepers still last)");
  cmd->add_option("--percdamp", percdamp, "GPTQ damping, a fraction of the mean Hessian diagonal (0.01)");
  cmd->add_option("--smooth", smooth_alpha,
                  fmt::format("SmoothQuant migration strength alpha folded into norms and up rows, 0 = off (atom-w4a4: {})",
                              atom.smooth_alpha));
  cmd->add_option("--k-smooth", k_smooth_alpha,
                  fmt::format("SmoothAttention strength alpha for the K cache, folded into q/k rows, 0 = off (atom-w4a4: {})",
                              atom.k_smooth_alpha));
  kv.add_to(cmd);
  cmd->add_option("--kv-rotation", kv_rotation,
                  "in front of the integer KV cache's Hadamard: hadamard (nothing), or rotations learned per layer and "
                  "KV head on the calibration text for V (learned-v: folded into v/o_proj), K (learned-k: applied after "
                  "RoPE, CPU only) or both (learned)");
  cmd->add_option("--residual-rotation", residual_rotation,
                  "an orthogonal R on the residual stream, folded into every linear, the embedding and the LM head "
                  "(norm weights folded first; zero run-time cost; a tied LM head is untied): none, hadamard "
                  "(randomized, seeded by --seed) or random (seeded orthogonal)");
  tri("--hessian-fp", "--hessian-quantized", &hessian_fp,
      "GPTQ Hessian from full-precision inputs (else from the quantized inputs the layer sees, as Atom)");
  cmd->add_flag("--atom-compat", atom_compat,
                "Atom's released-code choices: its GPTQ INT4 grid, Hessians from quantized inputs, K before RoPE, "
                "fp16 activations, none of nibble's additions (atom-w4a4: Atom's clips 0.9 and KV 1.0)");
  cmd->add_option("--calib-windows,--nsamples", calib_windows, "calibration windows (128)");
  cmd->add_option("--calib-ctx", calib_ctx,
                  "tokens per calibration window (default min(2048, the model's context); longer windows run past "
                  "the context, as Atom's code does with its fixed 2048)");
  cmd->add_option("--seed", seed, "calibration window seed (0)");
}

void RecipeOptions::apply(quant::Recipe& r) const {
  const std::string where = "recipe options";
  if (w_format) r.weight.format = quant::parse_format(*w_format, where);
  if (a_format) r.act.format = quant::parse_format(*a_format, where);
  if (group) r.weight.group = r.act.group = *group;
  if (w_group) r.weight.group = *w_group;
  if (a_group) r.act.group = *a_group;
  if (w_row_group) r.weight.row_group = *w_row_group;
  if (w_clip) r.weight.clip = *w_clip;
  if (a_clip) r.act.clip = *a_clip;
  if (keeper) {  // an explicit count replaces a preset's per-slot counts
    r.keeper = *keeper;
    r.keeper_by_slot.clear();
  }
  if (!keeper_by_slot.empty()) r.keeper_by_slot = keeper_by_slot;
  if (keeper_precision) r.keeper_precision = quant::parse_keeper_precision(*keeper_precision, "--keeper-precision");
  if (sort_metric) {
    check(*sort_metric == "hessian" || *sort_metric == "abs_mean", "--act-sort-metric",
          "must be hessian or abs_mean, not '{}'", *sort_metric);
    r.sort_metric = *sort_metric == "hessian" ? quant::SortMetric::Hessian : quant::SortMetric::AbsMean;
  }
  if (gptq) r.gptq = *gptq;
  if (reorder) r.reorder = *reorder;
  if (clip_search) r.clip_search = *clip_search;
  if (clip_by_gptq_loss) r.clip_by_gptq_loss = *clip_by_gptq_loss;
  if (group_hadamard) r.group_hadamard = *group_hadamard;
  if (percdamp) r.percdamp = *percdamp;
  if (act_order) r.act_order = *act_order;
  if (smooth_alpha) r.smooth_alpha = *smooth_alpha;
  if (k_smooth_alpha) r.k_smooth_alpha = *k_smooth_alpha;
  kv.apply(r.kv);
  if (kv_rotation) r.kv_rotation = quant::parse_kv_rotation(*kv_rotation, "--kv-rotation");
  if (residual_rotation)
    r.residual_rotation = quant::parse_residual_rotation(*residual_rotation, "--residual-rotation");
  if (hessian_fp) r.hessian_from_quantized_inputs = !*hessian_fp;
  if (calib_windows) r.calib_windows = *calib_windows;
  if (calib_ctx) r.calib_ctx = *calib_ctx;
  if (seed) r.seed = *seed;
  if (atom_compat) {
    r.apply_atom_compat();
    // Explicit clip ratios and KV choices still win over Atom's.
    if (a_clip) r.act.clip = *a_clip;
    kv.apply(r.kv);
  }
}

quant::Recipe RecipeOptions::build() const {
  quant::Recipe r = quant::Recipe::preset(recipe);
  apply(r);
  return r;
}

}  // namespace nibble::cli
