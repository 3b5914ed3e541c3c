#include "nibble/quant/ablation.h"

#include <fmt/format.h>

namespace nibble::quant {

std::vector<AblationStep> atom_ladder(int group, int64_t keeper, bool atom_compat, int64_t calib_windows,
                                      int64_t calib_ctx, uint64_t seed) {
  std::vector<AblationStep> steps;
  Recipe r = Recipe::preset("w4a4-rtn");
  r.calib_windows = calib_windows;
  r.calib_ctx = calib_ctx;
  r.seed = seed;
  int step = 0;
  auto push = [&](std::string label) {
    Recipe s = r;
    s.name = fmt::format("ladder-{}", ++step);
    if (atom_compat) s.apply_atom_compat();
    steps.push_back({std::move(label), s});
  };
  if (atom_compat) {
    // Atom's FP16 row: the unquantized model with its activations stored in fp16.
    Recipe fp = Recipe::preset("fp16");
    fp.name = "ladder-fp16";
    fp.fp16_activations = true;
    steps.push_back({"FP16 (fp16 activations, as Atom's code runs)", fp});
  }
  push("1. W4A4 RTN (per-channel W, per-token A)");
  r.reorder = true;
  r.keeper = keeper;
  r.keeper_precision = KeeperPrecision::Fp16;
  push(fmt::format("2. + reorder, {} keepers at FP16", keeper));
  r.keeper_precision = KeeperPrecision::Int8;
  push("3. keepers at INT8");
  r.weight.group = r.act.group = group;
  r.weight.row_group = 2;
  push(fmt::format("4. + group {} (W row-group 2)", group));
  r.weight.clip = 0.85f;
  r.act.clip = 0.9f;
  push("5. + clipping (A 0.9, W 0.85)");
  r.gptq = true;
  push("6. + GPTQ");
  r.kv = {4, true, 1.0f};
  push("7. + KV4 = Atom's full recipe");
  return steps;
}

}  // namespace nibble::quant
