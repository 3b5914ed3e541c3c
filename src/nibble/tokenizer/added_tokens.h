// Added tokens (tokenizer.json "added_tokens": <s>, <|eot_id|>, ...) are cut out of the text
// before the normalizer and the model see it, as Hugging Face's AddedVocabulary does: the
// leftmost match wins, the longest one at that position; lstrip/rstrip swallow the whitespace
// beside a match; a single_word token only matches between non-word characters.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::tokenizer {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;      // skipped by decode(skip_special = true)
  bool normalized = false;   // matched in the normalized text instead of the raw text
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

class AddedTokenSplitter {
 public:
  // Looks for `pattern` (the token's content, normalized for normalized tokens) in the text.
  void add(std::string pattern, const AddedToken& token);

  struct Piece {
    std::string_view text;
    int32_t id;  // -1: ordinary text for the model
  };
  // Covers all of `text` (valid UTF-8) with ordinary pieces and matched tokens, in order.
  std::vector<Piece> split(std::string_view text) const;

 private:
  struct Entry {
    std::string pattern;
    int32_t id;
    bool lstrip, rstrip, single_word;
  };
  std::vector<Entry> entries_;
  std::array<std::vector<uint32_t>, 256> by_first_byte_;  // indices into entries_, longest first
};

}  // namespace nibble::tokenizer
