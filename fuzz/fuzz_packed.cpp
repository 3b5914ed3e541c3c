// libFuzzer target: a whole packed model file (header, metadata with the config and recipe JSON,
// tensors) through the packed loader. Malformed input must end in nibble::Error; a file that loads
// must run one forward step to finite logits (the loader rejects what would make them non-finite).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "nibble/core/error.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = nibble::SafetensorsFile::parse(std::span<const uint8_t>(data, size), "fuzz");
    auto model = nibble::load_packed_model(*f);
    auto cache = model->new_cache(2);
    const int32_t tokens[] = {0, int32_t(model->config().vocab_size - 1)};
    const nibble::Step step{cache.get(), tokens, true};
    model->forward({&step, 1});
  } catch (const nibble::Error&) {
  }
  return 0;
}
