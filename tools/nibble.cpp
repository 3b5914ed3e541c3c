// nibble: 4-bit LLM quantization and inference. Subcommands follow llama.cpp's conventions
// (-m model, -f file, -p prompt, -n tokens). Errors print as one line and exit 1.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "nibble/core/error.h"
#include "tools/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"nibble: Atom-style W4A4 quantization and inference for Llama-family models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("nibble ") + NIBBLE_VERSION);
  nibble::cli::add_tokenize_command(app);
  nibble::cli::add_eval_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const nibble::Error& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
