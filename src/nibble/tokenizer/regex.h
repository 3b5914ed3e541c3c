// Regular expressions for tokenizer.json's Split/Replace patterns, compiled with PCRE2 in UTF
// mode with Unicode properties (UCP). The patterns are written for Oniguruma (Rust tokenizers);
// PCRE2 reads the constructs these files use (\p{L}, \p{N}, \s, (?i:...), lookahead) the same way.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::tokenizer {

struct Span {
  size_t begin = 0;
  size_t end = 0;
};

class Regex {
 public:
  // Throws nibble::Error(where, label + ": ...") when the pattern does not compile; `label` names
  // the pattern in that error and in matching errors.
  Regex(const std::string& pattern, std::string where, std::string label);

  // Every match in `text` (valid UTF-8), in order, the way Oniguruma's find_iter reports them: an
  // empty match right where the previous match ended is skipped by advancing one character.
  std::vector<Span> find_all(std::string_view text) const;

  // Whether a match starts exactly at byte `pos`.
  bool matches_at(std::string_view text, size_t pos) const;

 private:
  struct Code;
  std::shared_ptr<const Code> code_;
  std::string where_;
  std::string label_;
};

}  // namespace nibble::tokenizer
