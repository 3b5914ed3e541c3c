// ModelConfig: one description of every supported architecture, read from HF config.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace nibble {

enum class Arch { Llama, Mistral, Qwen2, Mixtral };
const char* arch_name(Arch a);  // the HF class name, e.g. "LlamaForCausalLM"

struct RopeScaling {
  std::string type = "default";  // "default" or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  Arch arch = Arch::Llama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2)
  int64_t sliding_window = 0;   // Mistral; 0 = none
  int64_t num_experts = 0;      // Mixtral: experts per layer (0 = dense MLP)
  int64_t num_experts_per_tok = 0;
  int32_t bos_token_id = -1;
  std::vector<int32_t> eos_token_ids;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // The window GPTQ and Atom score and calibrate with: 2048 tokens, or the context if shorter.
  int64_t default_window() const { return max_position_embeddings < 2048 ? max_position_embeddings : 2048; }

  // Parses a config.json object; `where` names the file for errors.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& where);
  // Parses config.json's text (the fuzz target's entry point).
  static ModelConfig from_text(std::string_view text, const std::string& where);
  static ModelConfig from_file(const std::filesystem::path& config_json);
  nlohmann::json to_json() const;
};

}  // namespace nibble
