// The integer KV cache: every token's K and V quantized on write, per KV head (group = head_dim),
// asymmetric INT4 or INT8 with an fp16 scale and a zero point (format.h Int4Asym / Int8Asym).
#pragma once

#include <memory>

#include "nibble/model/kv_cache.h"
#include "nibble/quant/format.h"
#include "nibble/quant/hadamard.h"

namespace nibble::quant {

FormatSpec kv_format_spec(const KVFormat& f, int64_t head_dim);


std::unique_ptr<KVCache> make_int_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim, int64_t capacity,
                                           const KVFormat& f);

}  // namespace nibble::quant
