#include "nibble/quant/recipe.h"

#include "nibble/core/error.h"
#include "nibble/core/json.h"
#include "nibble/quant/residual_rotation.h"

namespace nibble::quant {

std::vector<std::string> Recipe::preset_names() {
  return {"fp16",     "w4a16-g128", "w4a16-g128-gptq", "w8a8",  "w4a4-rtn", "atom-w4a4", "atom-w4a4-slot-keepers",
          "fp4-e2m1", "mxfp4",      "nvfp4"};
}

namespace {
constexpr float kAtomActClip = 0.9f;  // Atom's --a_clip_ratio in its paper recipe
}  // namespace

Recipe Recipe::preset(const std::string& name) {
  Recipe r;
  r.name = name;
  if (name == "fp16") {
  } else if (name == "w4a16-g128" || name == "w4a16-g128-gptq") {
    r.quantize_weights = true;
    r.weight = {Format::Int4Sym, 128, 1, 1.0f};
    r.gptq = name == "w4a16-g128-gptq";
  } else if (name == "w8a8") {
    r.quantize_weights = r.quantize_activations = true;
    r.weight = {Format::Int8Sym, 0, 1, 1.0f};  // per output channel
    r.act = {Format::Int8Sym, 0, 1, 1.0f};     // per token
  } else if (name == "w4a4-rtn") {
    r.quantize_weights = r.quantize_activations = true;
    r.weight = {Format::Int4Sym, 0, 1, 1.0f};
    r.act = {Format::Int4Sym, 0, 1, 1.0f};
  } else if (name == "atom-w4a4" || name == "atom-w4a4-slot-keepers") {
    r.quantize_weights = r.quantize_activations = true;
    r.weight = {Format::Int4Sym, 128, 2, 0.85f};
    r.act = {Format::Int4Sym, 128, 1, kAtomActClip};
    r.reorder = true;
    r.keeper = 128;
    r.keeper_precision = KeeperPrecision::Int8;
    r.gptq = true;
    // Beyond Atom, chosen by measurement on nibble-ref (notes/quantization.md): every quantization
    // group of weights and activations in a Hadamard-rotated basis, K quantized after RoPE in a
    // Hadamard-rotated basis, a per-group weight clip search inside GPTQ, and clip ratios for the
    // rotated activations (0.8) and the KV cache (0.9) chosen on calib.txt (Atom: 0.9 and 1.0).
    r.group_hadamard = true;
    r.act.clip = 0.8f;
    r.kv = {4, false, 0.9f, true};
    r.clip_search = true;
    // 128 more INT8 keepers on q/k/v and down_proj (+0.9% file on nibble-ref, ~+1% of a 7B's
    // linears), chosen on calibration text (notes/quantization.md, issue 20 session 10). A preset
    // beside the default, which must also fit MoE models, where counts per slot do not apply.
    if (name == "atom-w4a4-slot-keepers") r.keeper_by_slot = {256, 128, 128, 256};
  } else if (name == "fp4-e2m1") {
    r.quantize_weights = r.quantize_activations = true;
    r.weight = {Format::Fp4E2M1, 32, 1, 1.0f};
    r.act = {Format::Fp4E2M1, 32, 1, 1.0f};
  } else if (name == "mxfp4") {
    r.quantize_weights = r.quantize_activations = true;
    r.weight = {Format::Mxfp4, 32, 1, 1.0f};
    r.act = {Format::Mxfp4, 32, 1, 1.0f};
  } else if (name == "nvfp4") {
    r.quantize_weights = r.quantize_activations = true;
    r.weight = {Format::Nvfp4, 16, 1, 1.0f};
    r.act = {Format::Nvfp4, 16, 1, 1.0f};
  } else {
    std::string names;
    for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
    throw Error("--recipe", fmt::format("unknown recipe '{}' (presets: {})", name, names));
  }
  return r;
}

const char* kv_rotation_name(KVRotation r) {
  switch (r) {
    case KVRotation::Hadamard: return "hadamard";
    case KVRotation::LearnedV: return "learned-v";
    case KVRotation::LearnedK: return "learned-k";
    case KVRotation::Learned: return "learned";
  }
  return "?";
}

KVRotation parse_kv_rotation(const std::string& s, const std::string& where) {
  for (KVRotation r : {KVRotation::Hadamard, KVRotation::LearnedV, KVRotation::LearnedK, KVRotation::Learned})
    if (s == kv_rotation_name(r)) return r;
  throw Error(where, fmt::format("KV rotation '{}' is not hadamard, learned-v, learned-k or learned", s));
}

const char* residual_rotation_name(ResidualRotation r) {
  switch (r) {
    case ResidualRotation::None: return "none";
    case ResidualRotation::Hadamard: return "hadamard";
    case ResidualRotation::Random: return "random";
  }
  return "?";
}

ResidualRotation parse_residual_rotation(const std::string& s, const std::string& where) {
  for (ResidualRotation r : {ResidualRotation::None, ResidualRotation::Hadamard, ResidualRotation::Random})
    if (s == residual_rotation_name(r)) return r;
  throw Error(where, fmt::format("residual rotation '{}' is not none, hadamard or random", s));
}

void Recipe::apply_atom_compat() {
  atom_compat = true;
  hessian_from_quantized_inputs = true;
  fp16_activations = true;
  kv.k_before_rope = true;
  kv.hadamard = false;
  kv.clip = 1.0f;  // Atom never clips its KV cache (--kv_clip_ratio 1.0 in every recipe)
  // The tighter activation clip belongs to the Hadamard-rotated groups; Atom's groups take its 0.9.
  if (group_hadamard) act.clip = kAtomActClip;
  clip_search = false;
  clip_by_gptq_loss = false;
  act_order = false;
  group_hadamard = false;
  smooth_alpha = 0;
  k_smooth_alpha = 0;
  kv_rotation = KVRotation::Hadamard;
  residual_rotation = ResidualRotation::None;
  // Atom's GPTQ quantizer uses its own INT4 grid (format.h Int4SymAtomGptq); its RTN path the plain one.
  if (gptq && weight.format == Format::Int4Sym) weight.format = Format::Int4SymAtomGptq;
}

int64_t Recipe::keeper_for(std::optional<LinearSlot> slot) const {
  if (keeper_by_slot.empty() || !slot || *slot == LinearSlot::Router) return keeper;
  return keeper_by_slot[size_t(*slot)];
}

LinearQuantSpec Recipe::linear_spec(int64_t in, const std::string& where, std::optional<LinearSlot> slot) const {
  check(keeper_by_slot.empty() || keeper_by_slot.size() == 4, where,
        "--keeper-by-slot takes 4 counts (q/k/v, o_proj, gate/up, down_proj), not {}", keeper_by_slot.size());
  const int64_t kept = keeper_for(slot);
  LinearQuantSpec s;
  s.weight = weight;
  if (quantize_activations) s.act = act;
  s.keeper = kept;
  s.keeper_precision = keeper_precision;
  s.quantize_weights = quantize_weights;
  s.group_hadamard = group_hadamard;
  if (group_hadamard)
    check(quantize_weights && quantize_activations && weight.group == act.group && weight.group > 0 &&
              (weight.group & (weight.group - 1)) == 0,
          where, "--group-hadamard needs weights and activations quantized in equal power-of-two groups");
  check(kept >= 0 && kept < in, where, "--keeper {} must be below the layer's {} input channels", kept, in);
  std::vector<const FormatSpec*> used;
  if (quantize_weights) used.push_back(&s.weight);
  if (s.act) used.push_back(&*s.act);
  for (const FormatSpec* f : used) {
    validate_spec(*f, where);
    const int64_t main = in - s.keeper;
    check(f->group <= main, where, "group size {} is larger than the {} quantized channels ({} inputs - {} keepers)",
          f->group, main, in, s.keeper);
    if (f->group == 0 || main % f->group == 0) continue;
    // Groups must tile the quantized channels. With keepers, the remainder (the most salient of the
    // rest, since channels are sorted) joins them; without keepers the recipe does not fit.
    check(kept > 0, where, "group size {} does not divide the layer's {} input channels (give --keeper to hold the "
          "remainder at keeper precision, or another --group)", f->group, in);
    s.keeper += main % f->group;
  }
  for (const FormatSpec* f : used)
    check(f->group == 0 || (in - s.keeper) % f->group == 0, where,
          "weight group {} and activation group {} need different remainders on {} channels", weight.group,
          act.group, in);
  return s;
}

void Recipe::validate(const ModelConfig& c) const {
  const std::string where = fmt::format("recipe '{}' on {} (hidden {}, intermediate {})", name, arch_name(c.arch),
                                        c.hidden_size, c.intermediate_size);
  kv.validate(where);
  if (kv_rotation != KVRotation::Hadamard) {
    check(kv.bits < 16 && kv.hadamard && (c.head_dim & (c.head_dim - 1)) == 0 && needs_calibration(), where,
          "--kv-rotation {} learns rotations in front of a Hadamard-rotated integer KV cache (power-of-two head_dim) "
          "on calibration data: give --kv-bits 4 or 8 with --kv-hadamard and GPTQ or --reorder",
          kv_rotation_name(kv_rotation));
    check(calib_windows >= 2, where, "--kv-rotation {} learns on the first calibration windows and reports on the "
          "next: give at least 2", kv_rotation_name(kv_rotation));
    check(!learns_k_rotation() || (!kv.k_before_rope && k_smooth_alpha == 0), where,
          "--kv-rotation {} rotates K after RoPE: it needs --k-after-rope and no --k-smooth",
          kv_rotation_name(kv_rotation));
  }
  check(residual_rotation != ResidualRotation::Hadamard || has_hadamard(c.hidden_size), where,
        "--residual-rotation hadamard: no Hadamard construction of order {} here (2^k, or (q + 1)·2^k for a prime "
        "q ≡ 3 mod 4); use --residual-rotation random",
        c.hidden_size);
  if (!quantize_weights && !quantize_activations) return;
  const int bits = format_bits(weight.format);
  check(bits >= 2 && bits <= 8, where, "weight bits {} are outside 2..8", bits);
  check(calib_windows > 0 && (calib_ctx == 0 || calib_ctx > 1), where,
        "need at least one calibration window of at least 2 tokens");
  check(smooth_alpha >= 0 && smooth_alpha < 1, where, "--smooth {} is outside [0, 1)", smooth_alpha);
  check(!clip_by_gptq_loss || (gptq && clip_search), where, "--w-clip-gptq-loss needs GPTQ with --w-clip-search");
  check(k_smooth_alpha >= 0 && k_smooth_alpha < 1, where, "--k-smooth {} is outside [0, 1)", k_smooth_alpha);
  check((smooth_alpha == 0 && k_smooth_alpha == 0) || (gptq && !hessian_from_quantized_inputs && c.num_experts == 0), where,
        "--smooth and --k-smooth need GPTQ with full-precision Hessians (the statistics it rescales) and a dense MLP");
  if (weight.row_group > 1)
    for (int64_t n : {c.q_dim() + 2 * c.kv_dim(), c.hidden_size, 2 * c.intermediate_size})
      check(n % weight.row_group == 0, where, "--w-row-group {} does not divide {} output rows", weight.row_group, n);
  linear_spec(c.hidden_size, where + ", q/k/v input", LinearSlot::QKV);
  linear_spec(c.q_dim(), where + ", o_proj input", LinearSlot::O);
  linear_spec(c.hidden_size, where + ", gate/up input", LinearSlot::GateUp);
  linear_spec(c.intermediate_size, where + ", down_proj input", LinearSlot::Down);
  check(keeper_by_slot.empty() || c.num_experts == 0, where, "--keeper-by-slot covers dense models");
}

std::string Recipe::describe() const {
  if (!quantizes_anything()) return name + " (no quantization)";
  std::string s = name + ":";
  if (quantize_weights)
    s += fmt::format(" W {} g{}{} clip {}{}", format_name(weight.format), weight.group,
                     weight.row_group > 1 ? fmt::format(" rows{}", weight.row_group) : "", weight.clip,
                     gptq ? " GPTQ" : " RTN");
  if (quantize_activations) s += fmt::format(", A {} g{} clip {}", format_name(act.format), act.group, act.clip);
  if (reorder || keeper) s += fmt::format(", reorder {} keepers at {}", keeper, keeper_precision_name(keeper_precision));
  if (!keeper_by_slot.empty())
    s += fmt::format(" (q/k/v {}, o {}, gate/up {}, down {})", keeper_by_slot[0], keeper_by_slot[1], keeper_by_slot[2],
                     keeper_by_slot[3]);
  s += ", KV " + kv.describe();
  if (group_hadamard) s += ", group Hadamard";
  if (clip_search) s += clip_by_gptq_loss ? ", W clip search by GPTQ loss" : ", W clip search";
  if (act_order) s += ", GPTQ act-order";
  if (smooth_alpha > 0) s += fmt::format(", smooth {}", smooth_alpha);
  if (k_smooth_alpha > 0) s += fmt::format(", K smooth {}", k_smooth_alpha);
  if (kv_rotation != KVRotation::Hadamard) s += fmt::format(", KV rotation {}", kv_rotation_name(kv_rotation));
  if (residual_rotation != ResidualRotation::None)
    s += fmt::format(", residual rotation {}", residual_rotation_name(residual_rotation));
  if (fp16_activations) s += ", fp16 activations";
  if (atom_compat) s += ", atom-compat";
  return s;
}

namespace {
nlohmann::json spec_json(const FormatSpec& f) {
  return {{"format", format_name(f.format)}, {"group", f.group}, {"row_group", f.row_group}, {"clip", f.clip}};
}
FormatSpec spec_from_json(const nlohmann::json& parent, const char* key, const std::string& recipe_where) {
  check(parent.contains(key) && parent[key].is_object(), recipe_where, "field '{}' is missing or not an object", key);
  const nlohmann::json& j = parent[key];
  const std::string where = fmt::format("{} ({})", recipe_where, key);
  FormatSpec f;
  f.format = parse_format(json_field<std::string>(j, "format", where), where);
  f.group = json_field<int>(j, "group", where);
  f.row_group = json_field<int>(j, "row_group", where);
  f.clip = json_field<float>(j, "clip", where);
  return f;
}
}  // namespace

nlohmann::json Recipe::to_json() const {
  return {{"name", name},
          {"quantize_weights", quantize_weights},
          {"weight", spec_json(weight)},
          {"gptq", gptq},
          {"percdamp", percdamp},
          {"gptq_block", gptq_block},
          {"clip_search", clip_search},
          {"clip_by_gptq_loss", clip_by_gptq_loss},
          {"act_order", act_order},
          {"group_hadamard", group_hadamard},
          {"smooth_alpha", smooth_alpha},
          {"k_smooth_alpha", k_smooth_alpha},
          {"quantize_activations", quantize_activations},
          {"act", spec_json(act)},
          {"reorder", reorder},
          {"sort_metric", sort_metric == SortMetric::Hessian ? "hessian" : "abs_mean"},
          {"keeper", keeper},
          {"keeper_by_slot", keeper_by_slot},
          {"keeper_precision", keeper_precision_name(keeper_precision)},
          {"kv_bits", kv.bits},
          {"kv_k_before_rope", kv.k_before_rope},
          {"kv_clip", kv.clip},
          {"kv_hadamard", kv.hadamard},
          {"kv_rotation", kv_rotation_name(kv_rotation)},
          {"residual_rotation", residual_rotation_name(residual_rotation)},
          {"hessian_from_quantized_inputs", hessian_from_quantized_inputs},
          {"fp16_activations", fp16_activations},
          {"atom_compat", atom_compat},
          {"calib_windows", calib_windows},
          {"calib_ctx", calib_ctx},
          {"seed", seed}};
}

Recipe Recipe::from_json(const nlohmann::json& j, const std::string& where) {
  check(j.is_object(), where, "recipe metadata is not a JSON object");
  Recipe r;
  r.name = json_field<std::string>(j, "name", where);
  r.quantize_weights = json_field<bool>(j, "quantize_weights", where);
  r.weight = spec_from_json(j, "weight", where);
  r.gptq = json_field<bool>(j, "gptq", where);
  r.percdamp = json_field<double>(j, "percdamp", where);
  r.gptq_block = json_field<int64_t>(j, "gptq_block", where);
  r.clip_search = json_field<bool>(j, "clip_search", where);
  r.act_order = json_field_or<bool>(j, "act_order", false, where);  // absent in files written before it existed
  r.clip_by_gptq_loss = json_field_or<bool>(j, "clip_by_gptq_loss", false, where);
  r.group_hadamard = json_field_or<bool>(j, "group_hadamard", false, where);
  r.smooth_alpha = json_field_or<double>(j, "smooth_alpha", 0.0, where);  // absent in files written before it existed
  r.k_smooth_alpha = json_field_or<double>(j, "k_smooth_alpha", 0.0, where);
  r.quantize_activations = json_field<bool>(j, "quantize_activations", where);
  r.act = spec_from_json(j, "act", where);
  r.reorder = json_field<bool>(j, "reorder", where);
  const std::string metric = json_field<std::string>(j, "sort_metric", where);
  check(metric == "hessian" || metric == "abs_mean", where, "sort_metric '{}' is not hessian or abs_mean", metric);
  r.sort_metric = metric == "abs_mean" ? SortMetric::AbsMean : SortMetric::Hessian;
  r.keeper = json_field<int64_t>(j, "keeper", where);
  if (j.contains("keeper_by_slot")) {  // absent in files written before it existed
    const nlohmann::json& k = j["keeper_by_slot"];
    check(k.is_array(), where, "field 'keeper_by_slot' is not an array: {}", k.dump());
    for (const nlohmann::json& v : k) r.keeper_by_slot.push_back(json_as<int64_t>(v, "keeper_by_slot", where));
  }
  r.keeper_precision = parse_keeper_precision(json_field<std::string>(j, "keeper_precision", where), where);
  r.kv.bits = json_field<int>(j, "kv_bits", where);
  r.kv.k_before_rope = json_field<bool>(j, "kv_k_before_rope", where);
  r.kv.clip = json_field<float>(j, "kv_clip", where);
  r.kv.hadamard = json_field_or<bool>(j, "kv_hadamard", false, where);
  // absent in files written before it existed
  r.kv_rotation = parse_kv_rotation(json_field_or<std::string>(j, "kv_rotation", "hadamard", where), where);
  r.residual_rotation =  // absent in files written before it existed
      parse_residual_rotation(json_field_or<std::string>(j, "residual_rotation", "none", where), where);
  r.hessian_from_quantized_inputs = json_field<bool>(j, "hessian_from_quantized_inputs", where);
  r.fp16_activations = json_field_or<bool>(j, "fp16_activations", false, where);  // absent in files written before it existed
  r.atom_compat = json_field<bool>(j, "atom_compat", where);
  r.calib_windows = json_field<int64_t>(j, "calib_windows", where);
  r.calib_ctx = json_field<int64_t>(j, "calib_ctx", where);
  r.seed = json_field<uint64_t>(j, "seed", where);
  return r;
}

}  // namespace nibble::quant
