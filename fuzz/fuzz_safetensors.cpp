// libFuzzer target: the safetensors header parser. Malformed input must end in nibble::Error (any
// other exception escapes and is reported as a crash); every tensor view must lie inside the input.
#include <cstddef>
#include <cstdint>
#include <span>

#include "nibble/core/error.h"
#include "nibble/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = nibble::SafetensorsFile::parse(std::span<const uint8_t>(data, size), "fuzz");
    for (const auto& [name, t] : f->tensors()) {
      volatile uint8_t sink = 0;
      if (t.nbytes) sink = t.data[t.nbytes - 1];
      (void)sink;
    }
  } catch (const nibble::Error&) {
  }
  return 0;
}
