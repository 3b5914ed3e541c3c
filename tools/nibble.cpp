// nibble: 4-bit LLM quantization and inference. Subcommands follow llama.cpp's conventions
// (-m model, -f file, -p prompt, -n tokens). Errors print as one line and exit 1.
#include <unistd.h>

#include <cstdio>
#include <exception>
#include <fstream>

#include <CLI/CLI.hpp>

#include "nibble/core/error.h"
#include "nibble/io/packed.h"
#include "tools/commands.h"

namespace nibble::cli {

Tokenizer load_tokenizer(const std::string& model_path) {
  namespace fs = std::filesystem;
  if (!fs::is_regular_file(model_path) || fs::path(model_path).filename() == "tokenizer.json")
    return Tokenizer::load(model_path);
  // A packed file carries its tokenizer files; Tokenizer::load reads BOS/EOS from the files beside
  // tokenizer.json, so they are laid out in a private temporary folder.
  std::string json, config;
  check(packed_tokenizer_files(model_path, &json, &config), model_path,
        "the packed file holds no tokenizer.json (it was written without one)");
  const fs::path dir = fs::temp_directory_path() / ("nibble-tokenizer-" + std::to_string(getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "tokenizer.json", std::ios::binary) << json;
  if (!config.empty()) std::ofstream(dir / "tokenizer_config.json", std::ios::binary) << config;
  auto model_config = Model::load(model_path)->config().to_json();
  std::ofstream(dir / "config.json") << model_config.dump();
  Tokenizer tok = Tokenizer::load(dir);
  fs::remove_all(dir);
  return tok;
}

void KVOverride::add_to(CLI::App* cmd) {
  cmd->add_option("--kv-bits", bits, "KV cache: 4 or 8 (integer, asymmetric per token and head), 16 (fp16), 32 (fp32)");
  cmd->add_option("--kv-clip", clip, "clip ratio of an integer KV cache");
  cmd->add_flag_callback("--k-after-rope", [this] { k_after_rope = true; }, "quantize K after RoPE");
  cmd->add_flag_callback("--k-before-rope", [this] { k_after_rope = false; }, "quantize K before RoPE (Atom)");
  cmd->add_flag_callback("--kv-hadamard", [this] { hadamard = true; }, "quantize K/V in a Hadamard-rotated basis");
  cmd->add_flag_callback("--no-kv-hadamard", [this] { hadamard = false; }, "no Hadamard rotation of K/V");
}

void KVOverride::apply(KVFormat& f) const {
  if (bits) f.bits = *bits;
  if (clip) f.clip = *clip;
  if (k_after_rope) f.k_before_rope = !*k_after_rope;
  if (hadamard) f.hadamard = *hadamard;
}

void KVOverride::apply(Model& m) const {
  KVFormat f = m.kv_format();
  apply(f);
  m.set_kv_format(f);
}

}  // namespace nibble::cli

int main(int argc, char** argv) {
  CLI::App app{"nibble: Atom-style W4A4 quantization and inference for Llama-family models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("nibble ") + NIBBLE_VERSION);
  nibble::cli::add_generate_command(app);
  nibble::cli::add_perplexity_command(app);
  nibble::cli::add_tokenize_command(app);
  nibble::cli::add_inspect_command(app);
  nibble::cli::add_quantize_command(app);
  nibble::cli::add_ablate_command(app);
  nibble::cli::add_eval_command(app);
  nibble::cli::add_synth_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
