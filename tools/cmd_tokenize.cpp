// nibble tokenize: the ids of a text under a model's tokenizer.json, one "id<TAB>piece" line per
// token (the count on stderr), or {"ids": [...], "count": N} with --json.
#include <cstdio>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "nibble/io/text_file.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {

struct TokenizeArgs {
  std::string model, tokenizer, prompt, file;
  bool json = false, bos = false;
};

// Control characters and backslashes escaped so that every piece stays on its line.
std::string readable(const std::string& piece) {
  std::string out;
  for (const char c : piece) {
    switch (c) {
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\\': out += "\\\\"; break;
      default:
        if (uint8_t(c) < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", uint8_t(c));
        else out += c;
    }
  }
  return out;
}

void run_tokenize(const TokenizeArgs& a) {
  const Tokenizer tok = load_tokenizer(a.model, a.tokenizer);
  const std::string text = a.file.empty() ? a.prompt : read_text_file(a.file);
  const std::vector<int32_t> ids = tok.encode(text, a.bos);
  if (a.json) {
    fmt::print("{{\"ids\":[{}],\"count\":{}}}\n", fmt::join(ids, ","), ids.size());
    return;
  }
  std::string out;
  for (const int32_t id : ids) out += fmt::format("{}\t{}\n", id, readable(tok.piece(id)));
  std::fwrite(out.data(), 1, out.size(), stdout);
  std::fprintf(stderr, "%zu tokens\n", ids.size());
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Tokenize text with a model's tokenizer.json");
  cmd->add_option("-m,--model", args->model, "model directory, tokenizer.json or packed nibble file")->required();
  add_tokenizer_option(cmd, &args->tokenizer);
  CLI::Option_group* input = cmd->add_option_group("input", "the text to tokenize");
  input->add_option("-p,--prompt", args->prompt, "text given on the command line");
  input->add_option("-f,--file", args->file, "UTF-8 text file");
  input->require_option(1);
  cmd->add_flag("--json", args->json, "print {\"ids\": [...], \"count\": N}");
  cmd->add_flag("--bos", args->bos, "add the special tokens the tokenizer adds (BOS for Llama-2/Mistral)");
  cmd->callback([args] { run_tokenize(*args); });
}

}  // namespace nibble::cli
