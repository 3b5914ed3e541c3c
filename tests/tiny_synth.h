// The smallest Llama layout on which atom-w4a4's groups of 128 and 128 keepers fit every linear:
// hidden 256 (128 grouped + 128 keepers), intermediate 384, GQA (4 heads, 2 KV heads of 64), as a
// synthetic model of `recipe` (quant/synth.h) with a short calibration window recorded.
#pragma once

#include <cstdint>
#include <string>

#include "nibble/quant/synth.h"

namespace nibble::test {

inline quant::SynthOptions tiny_synth(const std::string& recipe, uint64_t seed) {
  quant::SynthOptions opt;
  opt.config = quant::synthetic_shape("llama-2-7b").config;
  opt.config.hidden_size = 256;
  opt.config.intermediate_size = 384;
  opt.config.num_layers = 2;
  opt.config.num_heads = 4;
  opt.config.num_kv_heads = 2;
  opt.config.head_dim = 64;
  opt.config.vocab_size = 300;
  opt.config.max_position_embeddings = 256;
  opt.recipe = quant::Recipe::preset(recipe);
  opt.recipe.calib_windows = 2;
  opt.recipe.calib_ctx = 64;
  opt.seed = seed;
  return opt;
}

}  // namespace nibble::test
