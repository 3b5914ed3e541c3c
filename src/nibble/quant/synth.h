// Random-weight checkpoints of real shapes, for speed work only (`nibble synth`): a Hugging Face
// directory for the fp16 recipe, otherwise a packed file with exactly the tensors `nibble quantize`
// writes for that recipe (names, dtypes, shapes, recipe JSON, metadata), holding random but valid
// values: uniform codes, positive scales that keep activations O(1) through the layers, a random
// permutation, norms near 1. Written tensor by tensor in seconds, without running a quantization.
// The metadata says `nibble.synthetic`; perplexity and eval warn on such a model. Never use one
// for accuracy.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "nibble/core/dtype.h"
#include "nibble/model/config.h"
#include "nibble/quant/recipe.h"

namespace nibble::quant {

// The shapes of a released model and the dtype of its checkpoint.
struct SyntheticShape {
  ModelConfig config;
  DType dtype = DType::F16;
};
// "llama-2-7b", "llama-2-13b", "llama-2-70b" (fp16 checkpoints), "llama-3-8b" (bf16, llama3 RoPE
// scaling as Llama 3.1's config); throws naming the choices on any other name.
SyntheticShape synthetic_shape(const std::string& like);
std::vector<std::string> synthetic_shape_names();

struct SynthOptions {
  ModelConfig config;   // a dense Llama-layout model (no q/k/v bias, no experts)
  DType dtype = DType::F16;  // of the tensors that stay unquantized (embedding, norms, lm_head)
  Recipe recipe;        // fp16 (nothing quantized): a Hugging Face directory; else a packed file
  uint64_t seed = 0;
  std::filesystem::path tokenizer;  // tokenizer.json or a folder holding it, copied along; empty: none
  std::string source = "synthetic";  // recorded as the packed file's nibble.source
};

// Writes the checkpoint to `out` (a directory for fp16, a file otherwise), holding one tensor in
// memory at a time. The contents depend on the seed alone, not on the thread count. Returns the
// bytes written.
int64_t write_synthetic_model(const SynthOptions& opt, const std::filesystem::path& out);

// Whether the model at `path` (a Hugging Face directory or a packed file) is synthetic.
bool is_synthetic(const std::filesystem::path& path);

}  // namespace nibble::quant
