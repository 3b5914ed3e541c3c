#include "nibble/model/config.h"

#include <cmath>
#include <fstream>
#include <limits>

#include "nibble/core/error.h"
#include "nibble/core/json.h"

namespace nibble {

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::Llama: return "LlamaForCausalLM";
    case Arch::Mistral: return "MistralForCausalLM";
    case Arch::Qwen2: return "Qwen2ForCausalLM";
    case Arch::Mixtral: return "MixtralForCausalLM";
  }
  return "?";
}

namespace {

// Sizes beyond 2^31 do not fit the BLAS calls (int dimensions), and are not a real model's.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

void check_positive_size(int64_t v, const char* key, const std::string& where) {
  check(v > 0 && v <= kMaxDim, where, "{} must be in 1..{}, not {}", key, kMaxDim, v);
}

void check_positive_real(double v, const char* key, const std::string& where) {
  check(std::isfinite(v) && v > 0, where, "{} must be a positive number, not {}", key, v);
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& where) {
  check(j.is_object(), where, "config is not a JSON object");
  ModelConfig c;
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty())
    arch = json_as<std::string>(j["architectures"][0], "architectures", where);
  else
    arch = json_field_or<std::string>(j, "model_type", "", where);
  if (arch == "LlamaForCausalLM" || arch == "llama") c.arch = Arch::Llama;
  else if (arch == "MistralForCausalLM" || arch == "mistral") c.arch = Arch::Mistral;
  else if (arch == "Qwen2ForCausalLM" || arch == "qwen2") c.arch = Arch::Qwen2;
  else if (arch == "MixtralForCausalLM" || arch == "mixtral") c.arch = Arch::Mixtral;
  else
    throw Error(where, fmt::format("unsupported architecture '{}' (supported: LlamaForCausalLM, "
                                   "MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM)",
                                   arch.empty() ? "<none given>" : arch));

  const std::string act = json_field_or<std::string>(j, "hidden_act", "silu", where);
  check(act == "silu", where, "hidden_act '{}' is not supported (only silu/SwiGLU)", act);

  c.vocab_size = json_field<int64_t>(j, "vocab_size", where);
  c.hidden_size = json_field<int64_t>(j, "hidden_size", where);
  c.intermediate_size = json_field<int64_t>(j, "intermediate_size", where);
  c.num_layers = json_field<int64_t>(j, "num_hidden_layers", where);
  c.num_heads = json_field<int64_t>(j, "num_attention_heads", where);
  c.num_kv_heads = json_field_or<int64_t>(j, "num_key_value_heads", c.num_heads, where);
  check(c.num_heads > 0 && c.hidden_size > 0, where, "num_attention_heads and hidden_size must be positive");
  c.head_dim = json_field_or<int64_t>(j, "head_dim", c.hidden_size / c.num_heads, where);
  c.max_position_embeddings = json_field_or<int64_t>(j, "max_position_embeddings", 2048, where);
  c.rms_norm_eps = json_field_or<double>(j, "rms_norm_eps", 1e-6, where);
  c.tie_word_embeddings = json_field_or<bool>(j, "tie_word_embeddings", false, where);
  c.attention_bias = json_field_or<bool>(j, "attention_bias", c.arch == Arch::Qwen2, where);
  c.sliding_window = json_field_or<int64_t>(j, "sliding_window", 0, where);
  if (c.arch == Arch::Qwen2 && !json_field_or<bool>(j, "use_sliding_window", false, where)) c.sliding_window = 0;
  if (c.arch == Arch::Mixtral) {
    c.num_experts = json_field<int64_t>(j, "num_local_experts", where);
    c.num_experts_per_tok = json_field<int64_t>(j, "num_experts_per_tok", where);
    check_positive_size(c.num_experts, "num_local_experts", where);
    check(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= c.num_experts, where,
          "num_experts_per_tok {} must be in 1..num_local_experts ({})", c.num_experts_per_tok, c.num_experts);
  }

  // RoPE: transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling.
  c.rope_theta = json_field_or<double>(j, "rope_theta", 10000.0, where);
  const nlohmann::json* rope = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rope = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) rope = &j["rope_scaling"];
  if (rope) {
    const auto& r = *rope;
    if (r.contains("rope_theta")) c.rope_theta = json_field_or<double>(r, "rope_theta", c.rope_theta, where);
    std::string type = json_field_or<std::string>(r, "rope_type", json_field_or<std::string>(r, "type", "default", where), where);
    if (type == "llama3") {
      c.rope_scaling.type = "llama3";
      c.rope_scaling.factor = json_field<double>(r, "factor", where);
      c.rope_scaling.low_freq_factor = json_field<double>(r, "low_freq_factor", where);
      c.rope_scaling.high_freq_factor = json_field<double>(r, "high_freq_factor", where);
      c.rope_scaling.original_max_position_embeddings =
          json_field<int64_t>(r, "original_max_position_embeddings", where);
    } else {
      check(type == "default", where, "rope type '{}' is not supported (default, llama3)", type);
    }
  }

  c.bos_token_id = json_field_or<int32_t>(j, "bos_token_id", -1, where);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array())
    for (const auto& id : j["eos_token_id"]) c.eos_token_ids.push_back(json_as<int32_t>(id, "eos_token_id", where));
  else if (j.contains("eos_token_id") && !j["eos_token_id"].is_null())
    c.eos_token_ids = {json_as<int32_t>(j["eos_token_id"], "eos_token_id", where)};

  check_positive_size(c.vocab_size, "vocab_size", where);
  check_positive_size(c.num_layers, "num_hidden_layers", where);
  check_positive_size(c.intermediate_size, "intermediate_size", where);
  check_positive_size(c.head_dim, "head_dim", where);
  check_positive_size(c.num_heads, "num_attention_heads", where);
  check_positive_size(c.hidden_size, "hidden_size", where);
  check_positive_size(c.max_position_embeddings, "max_position_embeddings", where);
  check(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0, where,
        "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", c.num_heads, c.num_kv_heads);
  check(c.num_heads * c.head_dim <= kMaxDim, where, "num_attention_heads x head_dim ({} x {}) is over {}",
        c.num_heads, c.head_dim, kMaxDim);
  check(c.head_dim % 2 == 0, where, "head_dim ({}) must be even for RoPE", c.head_dim);
  check(c.sliding_window >= 0, where, "sliding_window must not be negative, not {}", c.sliding_window);
  check_positive_real(c.rms_norm_eps, "rms_norm_eps", where);
  check_positive_real(c.rope_theta, "rope_theta", where);
  if (c.rope_scaling.type == "llama3") {
    check_positive_real(c.rope_scaling.factor, "rope_scaling.factor", where);
    check_positive_real(c.rope_scaling.low_freq_factor, "rope_scaling.low_freq_factor", where);
    check_positive_real(c.rope_scaling.high_freq_factor, "rope_scaling.high_freq_factor", where);
    check(c.rope_scaling.high_freq_factor > c.rope_scaling.low_freq_factor, where,
          "rope_scaling.high_freq_factor ({}) must exceed low_freq_factor ({})", c.rope_scaling.high_freq_factor,
          c.rope_scaling.low_freq_factor);
    check_positive_size(c.rope_scaling.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings",
                        where);
  }
  check(c.bos_token_id >= -1 && c.bos_token_id < c.vocab_size, where, "bos_token_id {} is outside the vocabulary (0..{})",
        c.bos_token_id, c.vocab_size - 1);
  for (int32_t id : c.eos_token_ids)
    check(id >= 0 && id < c.vocab_size, where, "eos_token_id {} is outside the vocabulary (0..{})", id,
          c.vocab_size - 1);
  return c;
}

ModelConfig ModelConfig::from_text(std::string_view text, const std::string& where) {
  return from_json(parse_json(text, where), where);
}

ModelConfig ModelConfig::from_file(const std::filesystem::path& path) {
  // Checked before opening: reading a FIFO blocks until a writer appears.
  check(std::filesystem::is_regular_file(path), path.string(), "not a regular file");
  std::ifstream in(path, std::ios::binary);
  check(bool(in), path.string(), "cannot open config file");
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  return from_text(text, path.string());
}

nlohmann::json ModelConfig::to_json() const {
  nlohmann::json j = {
      {"architectures", {arch_name(arch)}},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_layers},
      {"num_attention_heads", num_heads},
      {"num_key_value_heads", num_kv_heads},
      {"head_dim", head_dim},
      {"max_position_embeddings", max_position_embeddings},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"tie_word_embeddings", tie_word_embeddings},
      {"attention_bias", attention_bias},
      {"hidden_act", "silu"},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_ids},
  };
  if (sliding_window > 0) j["sliding_window"] = sliding_window;
  if (rope_scaling.type == "llama3")
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", rope_scaling.factor},
                         {"low_freq_factor", rope_scaling.low_freq_factor},
                         {"high_freq_factor", rope_scaling.high_freq_factor},
                         {"original_max_position_embeddings", rope_scaling.original_max_position_embeddings}};
  if (arch == Arch::Mixtral) {
    j["num_local_experts"] = num_experts;
    j["num_experts_per_tok"] = num_experts_per_tok;
  }
  return j;
}

}  // namespace nibble
