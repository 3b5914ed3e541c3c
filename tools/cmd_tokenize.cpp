// nibble tokenize: placeholder until the tokenizer lands.
#include "tools/commands.h"

namespace nibble::cli {
void add_tokenize_command(CLI::App& app) {
  app.add_subcommand("tokenize", "Tokenize text with a model's tokenizer.json");
}
}  // namespace nibble::cli
