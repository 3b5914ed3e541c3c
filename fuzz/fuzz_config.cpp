// libFuzzer target: arbitrary bytes as a config.json. Malformed or out-of-range input must end in
// nibble::Error naming the field (any other exception escapes and is reported as a crash).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "nibble/core/error.h"
#include "nibble/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    nibble::ModelConfig::from_text(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const nibble::Error&) {
  }
  return 0;
}
