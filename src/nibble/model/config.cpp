#include "nibble/model/config.h"

#include <fstream>

#include "nibble/core/error.h"

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

template <typename T>
T get_required(const nlohmann::json& j, const char* key, const std::string& where) {
  check(j.contains(key) && !j[key].is_null(), where, "missing required field '{}'", key);
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(where, fmt::format("field '{}' has the wrong type: {}", key, j[key].dump()));
  }
}

template <typename T>
T get_or(const nlohmann::json& j, const char* key, T fallback, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  try {
    return j[key].get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(where, fmt::format("field '{}' has the wrong type: {}", key, j[key].dump()));
  }
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& where) {
  check(j.is_object(), where, "config is not a JSON object");
  ModelConfig c;
  std::string arch;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty())
    arch = j["architectures"][0].get<std::string>();
  else
    arch = get_or<std::string>(j, "model_type", "", where);
  if (arch == "LlamaForCausalLM" || arch == "llama") c.arch = Arch::Llama;
  else if (arch == "MistralForCausalLM" || arch == "mistral") c.arch = Arch::Mistral;
  else if (arch == "Qwen2ForCausalLM" || arch == "qwen2") c.arch = Arch::Qwen2;
  else if (arch == "MixtralForCausalLM" || arch == "mixtral") c.arch = Arch::Mixtral;
  else
    throw Error(where, fmt::format("unsupported architecture '{}' (supported: LlamaForCausalLM, "
                                   "MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM)",
                                   arch.empty() ? "<none given>" : arch));

  const std::string act = get_or<std::string>(j, "hidden_act", "silu", where);
  check(act == "silu", where, "hidden_act '{}' is not supported (only silu/SwiGLU)", act);

  c.vocab_size = get_required<int64_t>(j, "vocab_size", where);
  c.hidden_size = get_required<int64_t>(j, "hidden_size", where);
  c.intermediate_size = get_required<int64_t>(j, "intermediate_size", where);
  c.num_layers = get_required<int64_t>(j, "num_hidden_layers", where);
  c.num_heads = get_required<int64_t>(j, "num_attention_heads", where);
  c.num_kv_heads = get_or<int64_t>(j, "num_key_value_heads", c.num_heads, where);
  check(c.num_heads > 0 && c.hidden_size > 0, where, "num_attention_heads and hidden_size must be positive");
  c.head_dim = get_or<int64_t>(j, "head_dim", c.hidden_size / c.num_heads, where);
  c.max_position_embeddings = get_or<int64_t>(j, "max_position_embeddings", 2048, where);
  c.rms_norm_eps = get_or<double>(j, "rms_norm_eps", 1e-6, where);
  c.tie_word_embeddings = get_or<bool>(j, "tie_word_embeddings", false, where);
  c.attention_bias = get_or<bool>(j, "attention_bias", c.arch == Arch::Qwen2, where);
  c.sliding_window = get_or<int64_t>(j, "sliding_window", 0, where);
  if (c.arch == Arch::Qwen2 && !get_or<bool>(j, "use_sliding_window", false, where)) c.sliding_window = 0;
  if (c.arch == Arch::Mixtral) {
    c.num_experts = get_required<int64_t>(j, "num_local_experts", where);
    c.num_experts_per_tok = get_required<int64_t>(j, "num_experts_per_tok", where);
    check(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= c.num_experts, where,
          "num_experts_per_tok {} must be in 1..num_local_experts ({})", c.num_experts_per_tok, c.num_experts);
  }

  // RoPE: transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling.
  c.rope_theta = get_or<double>(j, "rope_theta", 10000.0, where);
  const nlohmann::json* rope = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rope = &j["rope_parameters"];
  else if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) rope = &j["rope_scaling"];
  if (rope) {
    const auto& r = *rope;
    if (r.contains("rope_theta")) c.rope_theta = get_or<double>(r, "rope_theta", c.rope_theta, where);
    std::string type = get_or<std::string>(r, "rope_type", get_or<std::string>(r, "type", "default", where), where);
    if (type == "llama3") {
      c.rope_scaling.type = "llama3";
      c.rope_scaling.factor = get_required<double>(r, "factor", where);
      c.rope_scaling.low_freq_factor = get_required<double>(r, "low_freq_factor", where);
      c.rope_scaling.high_freq_factor = get_required<double>(r, "high_freq_factor", where);
      c.rope_scaling.original_max_position_embeddings =
          get_required<int64_t>(r, "original_max_position_embeddings", where);
    } else {
      check(type == "default", where, "rope type '{}' is not supported (default, llama3)", type);
    }
  }

  c.bos_token_id = get_or<int32_t>(j, "bos_token_id", -1, where);
  if (j.contains("eos_token_id") && j["eos_token_id"].is_array())
    c.eos_token_ids = j["eos_token_id"].get<std::vector<int32_t>>();
  else if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer())
    c.eos_token_ids = {j["eos_token_id"].get<int32_t>()};

  check(c.vocab_size > 0 && c.num_layers > 0 && c.intermediate_size > 0 && c.head_dim > 0, where,
        "vocab_size, num_hidden_layers, intermediate_size and head_dim must be positive");
  check(c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0, where,
        "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})", c.num_heads, c.num_kv_heads);
  check(c.head_dim % 2 == 0, where, "head_dim ({}) must be even for RoPE", c.head_dim);
  return c;
}

ModelConfig ModelConfig::from_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  check(bool(in), path.string(), "cannot open config file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(path.string(), fmt::format("malformed JSON at byte {}: {}", e.byte, e.what()));
  }
  return from_json(j, path.string());
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
