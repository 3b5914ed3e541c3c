// The `nibble` CLI's subcommands; each lives in tools/cmd_<name>.cpp and registers itself here.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "nibble/core/error.h"
#include "nibble/backend/backend.h"
#include "nibble/engine/request.h"
#include "nibble/model/model.h"
#include "nibble/tokenizer/tokenizer.h"

namespace nibble::cli {

void add_generate_command(CLI::App& app);
void add_perplexity_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_quantize_command(CLI::App& app);
void add_ablate_command(CLI::App& app);
void add_split_command(CLI::App& app);
void add_eval_command(CLI::App& app);
void add_synth_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_bench_serve_command(CLI::App& app);
void add_serve_command(CLI::App& app);

// --temp, --top-k, --top-p, --min-p, the penalties and --seed.
void add_sampling_options(CLI::App* cmd, SamplingParams* s);

// A warning on stderr when the model was written by `nibble synth` (random weights).
void warn_if_synthetic(const std::string& model_path);

// KV cache choices (--kv-bits, --kv-clip, --k-after-rope, --kv-hadamard): in a recipe, or at run
// time over what a model file says, to measure cache formats without re-quantizing.
struct KVOverride {
  std::optional<int> bits;
  std::optional<float> clip;
  std::optional<bool> k_after_rope, hadamard;
  void add_to(CLI::App* cmd);
  void apply(KVFormat& f) const;
  void apply(Model& m) const;
};

// `--device cuda` is checked when the option is parsed, before any model or checkpoint is read: without
// a usable GPU the error comes at once, not after loading (a 7B fp16 model can exhaust a CPU machine's memory).
void check_cuda_when_named(const std::string& device);

// Where a model runs: --device cpu|cuda|auto (auto: cuda when a GPU is there and the model's
// formats have CUDA kernels, else the CPU, saying why on stderr), and the GPU's memory knobs.
struct DeviceOptions {
  std::string device = "auto";
  double gpu_mem_fraction = 0.9;
  double gpu_mem_gb = 0;
  int64_t kv_pages = 0;
  int tp = 1;  // ranks of tensor parallelism
  void add_to(CLI::App* cmd);
  // An executor for `model` whose sequences reach `max_context` tokens and whose steps carry up
  // to `max_batch_tokens`. Prints the device that runs it on stderr.
  std::unique_ptr<Executor> make(Model& model, int64_t max_context, int64_t max_batch_tokens) const;
};

// --tokenizer PATH: every command that reads a tokenizer takes one in place of the model's.
void add_tokenizer_option(CLI::App* cmd, std::string* path);

// The tokenizer at `tokenizer_path` when given, else the one of the model given with -m: a
// Hugging Face directory's tokenizer.json, a tokenizer.json itself, or the one embedded in a
// packed nibble file (read from memory: nothing is written anywhere).
Tokenizer load_tokenizer(const std::string& model_path, const std::string& tokenizer_path);

struct LoadedModel {
  std::unique_ptr<Model> model;
  Tokenizer tokenizer;
};
// The model and its tokenizer (as load_tokenizer); a packed file is opened once for both.
LoadedModel load_model_and_tokenizer(const std::string& model_path, const std::string& tokenizer_path);

}  // namespace nibble::cli
