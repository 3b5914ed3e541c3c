// `nibble quantize`: a Hugging Face checkpoint to a packed file, one layer at a time, so that a
// model far larger than memory quantizes. The checkpoint stays mapped in its own dtype; a layer is
// read to fp32 when its turn comes, quantized (LayerQuantizer), written to its own file in a work
// folder beside the output, moves the calibration stream on, and is dropped. At the end the work
// folder's files are copied, tensor by tensor, into the output (the same bytes save_packed_model
// writes for the model quantized in memory), which is renamed into place only when complete.
//
// Peak host memory ≈ one layer in fp32 + the calibration stream + one layer's statistics
// (notes/quantization.md gives the formula). The work folder is what --resume continues from: the
// finished layers are read back and their calibration passes replayed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

#include "nibble/quant/quantize_model.h"
#include "nibble/quant/recipe.h"

namespace nibble::quant {

struct CheckpointQuantizeOptions {
  std::filesystem::path model;      // Hugging Face checkpoint directory
  std::filesystem::path tokenizer;  // tokenizer.json or its folder, embedded when present
  std::filesystem::path out;
  std::string calib_where;          // names the calibration text in messages
  bool resume = false;              // continue the unfinished run of the same recipe and inputs
  int64_t stop_after_layers = 0;    // > 0: quantize this many layers, keep the work folder, write no output
  bool show_progress = true;
  bool on_device = false;           // statistics and GPTQ on the CUDA device (LayerQuantizer)
};

struct CheckpointQuantizeResult {
  QuantizeReport report;
  Recipe recipe;                 // as recorded in the file (calib_ctx filled in)
  int64_t bytes = 0;             // of the output (0 when stopped early)
  int64_t weight_bytes = 0;      // the weights as stored (Model::storage_bytes of the quantized model)
  int64_t layers_resumed = 0;    // finished layers read back from the work folder
  int64_t layers_done = 0;       // layers finished by the end of this run (resumed included)
  std::filesystem::path work_dir;
};

// The work folder of an output: `.NAME.partial` beside it.
std::filesystem::path partial_dir(const std::filesystem::path& out);

// Bytes the packed file of `recipe` on the checkpoint will take, from the shapes alone (the
// disk-space check before the run); within a few percent.
int64_t expected_packed_bytes(const Recipe& recipe, const ModelConfig& c, int source_dtype_bytes);

// Throws nibble::Error naming the output's folder when its free space is below what a run of
// `expected` output bytes needs there: the finished layers' files in `work` (less what is already
// there), then the output beside them.
void check_free_disk(const std::filesystem::path& out, const std::filesystem::path& work, int64_t expected);

CheckpointQuantizeResult quantize_checkpoint(const Recipe& recipe, std::span<const int32_t> calib_tokens,
                                             const CheckpointQuantizeOptions& opt);

}  // namespace nibble::quant
