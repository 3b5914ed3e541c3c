// The `nibble` CLI's subcommands; each lives in tools/cmd_<name>.cpp and registers itself here.
#pragma once

#include <CLI/CLI.hpp>

namespace nibble::cli {

void add_tokenize_command(CLI::App& app);
void add_eval_command(CLI::App& app);

}  // namespace nibble::cli
