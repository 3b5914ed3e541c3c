// The packed model file: one .safetensors that any safetensors reader opens. Per quantized linear
// `<name>.codes` (uint8, two INT4 codes a byte), `.scales` (fp16 bits, or E8M0/E4M3 codes),
// `.zeros`, `.tensor_scale`, `.perm` (int32), `.keeper_codes` + `.keeper_scales` or `.keeper_fp16`,
// `.bias` (fp16); untouched tensors (embedding, norms, router, lm_head) in the most compact dtype
// that holds their values exactly (bf16, fp16 or fp32); the tokenizer files as uint8 tensors; and
// in `__metadata__` the recipe, model config, source and nibble version as JSON.
// Loading rebuilds the same QuantLinears, so the logits equal the in-memory quantized model's.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"

namespace nibble {

// Writes `model` (quantized in memory by quant::quantize_model) with `recipe_json`; tokenizer files
// from `tokenizer_dir` are embedded so the file stands alone. Returns the bytes written.
int64_t save_packed_model(const Model& model, const std::string& recipe_json,
                          const std::filesystem::path& tokenizer_dir, const std::filesystem::path& out);

std::unique_ptr<Model> load_packed_model(const std::filesystem::path& path);
// The same from an opened (or in-memory: the fuzz target) file; the model copies what it keeps.
std::unique_ptr<Model> load_packed_model(const SafetensorsFile& file);

// The embedded tokenizer.json (and tokenizer_config.json, may be empty) of a packed file.
bool packed_tokenizer_files(const std::filesystem::path& path, std::string* tokenizer_json,
                            std::string* tokenizer_config);


}  // namespace nibble
