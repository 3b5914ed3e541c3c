// Where a quantized model's loss is: pieces of it put back to full precision one at a time
// (a layer, one slot's weights or activations in every layer, K or V of the cache), each variant
// scored against the FP model (nibble split). Variants are built on a packed model loaded anew.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "nibble/model/kv_cache.h"
#include "nibble/model/model.h"

namespace nibble::quant {

// A cache whose K and V of each layer have their own format: k_formats[l], v_formats[l].
std::unique_ptr<KVCache> make_mixed_kv_cache(const ModelConfig& c, std::vector<KVFormat> k_formats,
                                             std::vector<KVFormat> v_formats, int64_t capacity);

// Layer l of `q` becomes `fp`'s (moved out of it): its linears and norms at full precision.
void restore_layer(Model& q, Model& fp, int l);
// The activations (and keeper activations) of `slot` in every layer are no longer quantized; the
// weights stay as they are.
void restore_activations(Model& q, LinearSlot slot);
// The weights of `slot` in every layer become `fp`'s, in the quantized linear's channel order and
// basis; its activations stay quantized. Only for the gathered slots (q/k/v, o_proj): gate/up rows
// and down_proj columns carry an order folded at quantization time that the packed file does not keep.
void restore_weights(Model& q, Model& fp, LinearSlot slot);

}  // namespace nibble::quant
