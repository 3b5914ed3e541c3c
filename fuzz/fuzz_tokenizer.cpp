// libFuzzer target: arbitrary bytes as a tokenizer.json. A malformed file must end in
// nibble::Error; a file that loads must encode, decode and stream a few texts without crashing,
// decode to valid UTF-8, and stream exactly what decode() returns.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/core/error.h"
#include "nibble/io/text_file.h"
#include "nibble/tokenizer/tokenizer.h"

namespace {

const char* const kTexts[] = {"", "Hello world", "  <s>x</s> y ", "caf\xc3\xa9 \xf0\x9f\x98\x80\n\t\r\n 12345",
                              "<|begin_of_text|>I'm here<|eot_id|>"};

void check_decoding(const nibble::Tokenizer& tok, const std::vector<int32_t>& ids) {
  const std::string decoded = tok.decode(ids);
  if (nibble::find_invalid_utf8(decoded) != std::string_view::npos) __builtin_trap();
  for (const bool skip_special : {false, true}) {
    nibble::StreamDecoder stream(tok, skip_special);
    std::string streamed;
    for (const int32_t id : ids) streamed += stream.push(id);
    streamed += stream.flush();
    if (streamed != tok.decode(ids, skip_special)) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const nibble::Tokenizer tok =
        nibble::Tokenizer::from_json_string(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    for (const char* text : kTexts) check_decoding(tok, tok.encode(text, true));
    // The first ids of the vocab, in order: byte pieces and special tokens next to each other.
    std::vector<int32_t> ids;
    for (int32_t id = 0; id < tok.vocab_size() && ids.size() < 300; ++id) {
      try {
        tok.piece(id);
        ids.push_back(id);
      } catch (const nibble::Error&) {  // a hole in the ids
      }
    }
    check_decoding(tok, ids);
  } catch (const nibble::Error&) {
  }
  return 0;
}
