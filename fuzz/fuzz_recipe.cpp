// libFuzzer target: arbitrary bytes as a packed file's recipe JSON, read and validated against a
// small Llama config as the packed loader does. Malformed input must end in nibble::Error.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "nibble/core/error.h"
#include "nibble/core/json.h"
#include "nibble/quant/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nibble::ModelConfig config = nibble::ModelConfig::from_text(
      R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})",
      "fuzz config");
  try {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    const auto recipe = nibble::quant::Recipe::from_json(nibble::parse_json(text, "fuzz"), "fuzz");
    recipe.validate(config);
    (void)recipe.describe();
  } catch (const nibble::Error&) {
  }
  return 0;
}
