// The integer KV cache: every token's K and V quantized on write, per KV head (group = head_dim),
// asymmetric INT4 or INT8 with an fp16 scale and a zero point (format.h Int4Asym / Int8Asym).
#pragma once

#include <memory>
#include <string>

#include "nibble/model/kv_cache.h"
#include "nibble/quant/format.h"
#include "nibble/quant/hadamard.h"

namespace nibble::quant {

FormatSpec kv_format_spec(const KVFormat& f, int64_t head_dim);


std::unique_ptr<KVCache> make_int_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim, int64_t capacity,
                                           const KVFormat& f);

// A KIVI-style K cache, simulated on the CPU (no GPU kernel reads it): K quantized in blocks of
// `block` tokens, each channel of a head (per_channel) or each token's head vector (as today) its
// own group of `f`'s integer format and clip; V stored as `f` says. With `residual`, the newest block
// stays fp16 until a write starts past its end (KIVI's residual: at most block - 1 tokens of fp16 K
// per layer and sequence, whatever the length), so a window fed in pieces of `block` tokens is
// scored as a decode would see it; without, every block present is quantized at each read, an
// incomplete one over the tokens it has. `hadamard` rotates each head vector before quantization
// (undone on read; the fp16 residual is stored unrotated).
struct BlockKeyFormat {
  int64_t block = 128;
  bool per_channel = true;
  bool residual = true;
  bool hadamard = true;
  std::string describe() const;
};
std::unique_ptr<KVCache> make_block_key_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim,
                                                 int64_t capacity, const KVFormat& f, const BlockKeyFormat& k);

}  // namespace nibble::quant
