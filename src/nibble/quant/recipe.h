// A quantization recipe: every knob of Atom's method (and the other formats) in one struct, with
// named presets. It travels inside the packed file as JSON, so a file says how it was made.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/model/config.h"
#include "nibble/model/kv_cache.h"
#include "nibble/model/model.h"
#include "nibble/quant/quant_linear.h"

namespace nibble::quant {

enum class SortMetric { Hessian, AbsMean };  // Atom's --act_sort_metric

// What sits in front of the integer KV cache's per-head Hadamard: nothing, or rotations learned per
// (layer, KV head) on calibration data (quant/kv_rotation.h): V's folded into v_proj and o_proj,
// K's applied after RoPE at run time (stored in the packed file).
enum class KVRotation { Hadamard, LearnedV, LearnedK, Learned };
const char* kv_rotation_name(KVRotation r);
KVRotation parse_kv_rotation(const std::string& s, const std::string& where);

// An orthogonal R applied to the residual stream (x := Rᵀx), folded into the weights before
// calibration (quant/residual_rotation.h): none, a randomized Hadamard, or a random orthogonal matrix.
enum class ResidualRotation { None, Hadamard, Random };
const char* residual_rotation_name(ResidualRotation r);
ResidualRotation parse_residual_rotation(const std::string& s, const std::string& where);

struct Recipe {
  std::string name = "fp16";
  bool quantize_weights = false;
  FormatSpec weight{Format::Int4Sym, 128, 1, 1.0f};
  bool gptq = false;
  double percdamp = 0.01;
  // GPTQ's act-order inside Atom's layout: the INT4 channels of each reordered linear stored (and so
  // quantized by GPTQ) most salient first, the keepers still last; the same groups, another order.
  bool act_order = false;
  int64_t gptq_block = 128;
  bool clip_search = false;  // per-group weight clip minimising the Hessian-weighted error (beyond Atom)
  // The clip search scores a clip by GPTQ's loss of the group (its error after the compensation
  // inside the group) rather than by diag(H) times the rounding error (GptqOptions).
  bool clip_by_gptq_loss = false;
  bool group_hadamard = false;  // rotate each quantization group by a Hadamard matrix (beyond Atom)
  // SmoothQuant's migration strength α, folded into norms and up rows (quant/smooth.h); 0: off.
  double smooth_alpha = 0;
  // SmoothAttention's strength for the K cache, folded into the q and k rows (quant/smooth.h); 0: off.
  double k_smooth_alpha = 0;

  bool quantize_activations = false;
  FormatSpec act{Format::Int4Sym, 128, 1, 1.0f};

  bool reorder = false;
  SortMetric sort_metric = SortMetric::Hessian;
  int64_t keeper = 0;
  // Keepers of q/k/v, o_proj, gate/up and down_proj in that order, in place of `keeper` (the same
  // memory spent where the loss is); empty: `keeper` everywhere.
  std::vector<int64_t> keeper_by_slot;
  KeeperPrecision keeper_precision = KeeperPrecision::Int8;

  KVFormat kv{16, true, 1.0f};
  KVRotation kv_rotation = KVRotation::Hadamard;
  bool learns_k_rotation() const { return kv_rotation == KVRotation::LearnedK || kv_rotation == KVRotation::Learned; }
  bool learns_v_rotation() const { return kv_rotation == KVRotation::LearnedV || kv_rotation == KVRotation::Learned; }
  // QuaRot's / SpinQuant's R1 (not learned), seeded by `seed`: the whole recipe runs on the rotated
  // FP model, the same network in another basis of the residual stream.
  ResidualRotation residual_rotation = ResidualRotation::None;

  // GPTQ's Hessian from the activations the quantized linear really sees (gathered and
  // quantized, as Atom) rather than from the full-precision ones.
  bool hessian_from_quantized_inputs = false;
  // Activations stored in fp16 between operations, as Atom's code runs the model (else fp32).
  bool fp16_activations = false;
  bool atom_compat = false;

  int64_t calib_windows = 128;
  // Tokens per calibration window; 0: min(2048, the model's context). A longer window runs past
  // the context the model was trained at, as Atom's code does (its model.seqlen is fixed at 2048).
  int64_t calib_ctx = 0;
  uint64_t seed = 0;

  static Recipe preset(const std::string& name);
  static std::vector<std::string> preset_names();
  // Atom's released-code choices: its GPTQ grid, Hessians from quantized inputs, K before RoPE,
  // fp16 activations.
  void apply_atom_compat();

  // The spec of one linear with `in` input channels in `slot` (none: a slot without its own keeper
  // count); throws when the recipe does not fit it.
  LinearQuantSpec linear_spec(int64_t in, const std::string& where, std::optional<LinearSlot> slot = std::nullopt) const;
  // The keepers of `slot`: keeper_by_slot's entry for a dense model's four linears, else `keeper`.
  int64_t keeper_for(std::optional<LinearSlot> slot) const;
  // Checks the recipe against every linear of the model (group divides K - keeper, keeper < K, ...).
  void validate(const ModelConfig& c) const;
  bool quantizes_anything() const { return quantize_weights || quantize_activations || kv.bits < 16; }
  // Only the channel order and GPTQ's Hessians come from calibration text; RTN needs none.
  bool needs_calibration() const { return reorder || gptq; }
  std::string describe() const;

  nlohmann::json to_json() const;
  static Recipe from_json(const nlohmann::json& j, const std::string& where);
};

}  // namespace nibble::quant
