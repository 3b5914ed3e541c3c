// The packed model file: one .safetensors that any safetensors reader opens. Per quantized linear
// `<name>.codes` (uint8, two INT4 codes a byte), `.scales` (fp16 bits, or E8M0/E4M3 codes),
// `.zeros`, `.tensor_scale`, `.perm` (int32), `.keeper_codes` + `.keeper_scales` or `.keeper_fp16`,
// `.bias` (fp16); untouched tensors (embedding, norms, router, lm_head) in the most compact dtype
// that holds their values exactly (bf16, fp16 or fp32); the tokenizer files as uint8 tensors; and
// in `__metadata__` the recipe, model config and nibble version as JSON, `nibble.source` (the
// source checkpoint folder's name, never a local path) and `nibble.source_sha256` (SHA-256 of the
// source's .safetensors files, concatenated in file-name order: identifies the exact weights).
// Loading rebuilds the same QuantLinears, so the logits equal the in-memory quantized model's.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/recipe.h"
#include "nibble/tokenizer/tokenizer.h"

namespace nibble {

// Writes `model` (quantized in memory by quant::quantize_model from the checkpoint at
// model.source()) with `recipe_json`; `tokenizer` (a tokenizer.json or a folder holding one) and
// the tokenizer_config.json beside it are embedded when present, so the file stands alone. `out` is written by write_output_file
// (never over the source or the tokenizer files). Returns the bytes written.
int64_t save_packed_model(const Model& model, const std::string& recipe_json,
                          const std::filesystem::path& tokenizer, const std::filesystem::path& out);

// The pieces save_packed_model writes, for writers that hold one layer at a time
// (quant/quantize_checkpoint.h): one layer's tensors; the embedding, final norm and (untied) LM
// head; the tokenizer files and metadata. The same pieces in any order make the same file.
void add_packed_layer(SafetensorsWriter& w, const Layer& layer, int l, const ModelConfig& c);
void add_packed_outer(SafetensorsWriter& w, const ModelConfig& c, const std::vector<float>& embedding,
                      const std::vector<float>& final_norm, const Linear* lm_head);
void add_packed_metadata(SafetensorsWriter& w, const ModelConfig& c, const std::string& recipe_json,
                         const std::filesystem::path& source, const std::string& source_sha256,
                         const std::filesystem::path& tokenizer);
// SHA-256 (OpenSSL's libcrypto) of the checkpoint's .safetensors files, concatenated in the order
// Checkpoint lists them (file-name order): reading them back costs a fraction of loading them.
std::string checkpoint_sha256(const Checkpoint& ckpt);
// Layer l of a file holding the tensors add_packed_layer wrote (and nothing else but a tokenizer).
Layer load_packed_layer(const SafetensorsFile& file, const ModelConfig& c, const quant::Recipe& recipe, int l);

std::unique_ptr<Model> load_packed_model(const std::filesystem::path& path);
// The same from a file already open (commands read the model and its tokenizer from one opening;
// the fuzz target passes an in-memory file); the model copies what it keeps.
std::unique_ptr<Model> load_packed_model(const SafetensorsFile& file);

// The tokenizer files embedded in a packed file (config.json: its nibble.config metadata, which
// carries bos_token_id/eos_token_id); nullopt when it was written without a tokenizer.
std::optional<TokenizerFiles> packed_tokenizer_files(const SafetensorsFile& file);


}  // namespace nibble
