// nibble synth --like llama-2-7b --recipe atom-w4a4 -o FILE: a random-weight checkpoint of a real
// model's shapes, for speed work only (src/nibble/quant/synth.h).
#include <chrono>
#include <cstdio>

#include "nibble/core/progress.h"
#include "nibble/quant/synth.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct SynthArgs {
  std::string like, recipe = "atom-w4a4", out, tokenizer;
  int64_t layers = 0;
  uint64_t seed = 0;
};

void run_synth(const SynthArgs& a) {
  const quant::SyntheticShape shape = quant::synthetic_shape(a.like);
  quant::SynthOptions opt;
  opt.config = shape.config;
  if (a.layers > 0) opt.config.num_layers = a.layers;
  opt.dtype = shape.dtype;
  opt.recipe = quant::Recipe::preset(a.recipe);
  opt.seed = a.seed;
  opt.tokenizer = a.tokenizer;
  opt.source = fmt::format("synthetic: random weights shaped like {} (seed {})", a.like, a.seed);
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t bytes = quant::write_synthetic_model(opt, a.out);
  std::printf("wrote %s: %.2f GB in %.1f s, random weights shaped like %s (%lld layers), recipe %s, seed %llu\n",
              a.out.c_str(), double(bytes) / 1e9, seconds_since(t0), a.like.c_str(), (long long)opt.config.num_layers,
              a.recipe.c_str(), (unsigned long long)a.seed);
  std::printf("synthetic: for speed work only; its perplexity and accuracy mean nothing%s\n",
              a.tokenizer.empty() ? " (no tokenizer: give --tokenizer to run text through it)" : "");
}
}  // namespace

void warn_if_synthetic(const std::string& model_path) {
  if (quant::is_synthetic(model_path))
    std::fprintf(stderr, "warning: %s is a synthetic random-weight model (nibble synth): for speed work only, its "
                 "perplexity and accuracy mean nothing\n", model_path.c_str());
}

void add_synth_command(CLI::App& app) {
  auto a = std::make_shared<SynthArgs>();
  CLI::App* cmd = app.add_subcommand(
      "synth", "Write a random-weight checkpoint of a real model's shapes in seconds, for speed work only (never for "
               "accuracy): a Hugging Face directory for fp16, else the packed file `nibble quantize` would write");
  std::string likes;
  for (const auto& n : quant::synthetic_shape_names()) likes += (likes.empty() ? "" : ", ") + n;
  cmd->add_option("--like", a->like, "the model whose shapes to copy: " + likes)->required();
  cmd->add_option("--recipe", a->recipe, "fp16 (a Hugging Face directory), w8a8, atom-w4a4, or another INT preset")
      ->capture_default_str();
  cmd->add_option("-o,--output", a->out, "packed file (or, for fp16, directory) to write")->required();
  cmd->add_option("--layers", a->layers, "number of layers instead of the model's (tests, quick runs)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", a->seed, "seed of the random weights")->capture_default_str();
  cmd->add_option("--tokenizer", a->tokenizer, "tokenizer.json (or a folder holding it) to include; default none");
  cmd->callback([a] { run_synth(*a); });
}

}  // namespace nibble::cli
