// libFuzzer target: the safetensors header parser and, when a header parses, the packed model's
// metadata (recipe and config JSON) as the packed loader reads them. nibble::Error is a clean
// refusal; a crash, hang or sanitizer report is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "nibble/core/error.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/config.h"
#include "nibble/quant/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = nibble::SafetensorsFile::parse(std::span<const uint8_t>(data, size), "fuzz");
    for (const auto& [name, t] : f->tensors()) {
      volatile uint8_t sink = 0;
      if (t.nbytes) sink = t.data[t.nbytes - 1];  // every view must lie inside the input
      (void)sink;
    }
    const auto& meta = f->metadata();
    auto config = meta.find("nibble.config");
    auto recipe = meta.find("nibble.recipe");
    if (config != meta.end() && recipe != meta.end()) {
      const auto c = nibble::ModelConfig::from_json(nlohmann::json::parse(config->second), "fuzz config");
      nibble::quant::Recipe::from_json(nlohmann::json::parse(recipe->second), "fuzz recipe").validate(c);
    }
  } catch (const nibble::Error&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}
