#include "nibble/tokenizer/added_tokens.h"

#include <algorithm>

#include "nibble/tokenizer/regex.h"
#include "nibble/tokenizer/utf8.h"

namespace nibble::tokenizer {

namespace {

// Rust regex's Unicode \w, which Hugging Face uses to decide what a word character is.
bool is_word_char_at(std::string_view text, size_t pos) {
  static const Regex word(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", "nibble", "single_word test");
  return word.matches_at(text, pos);
}

bool ends_with_word(std::string_view text) {
  if (text.empty()) return false;
  size_t last = text.size() - 1;
  while (last > 0 && (uint8_t(text[last]) & 0xc0) == 0x80) --last;
  return is_word_char_at(text, last);
}

bool starts_with_word(std::string_view text) { return !text.empty() && is_word_char_at(text, 0); }

// Start of the whitespace run that ends `text`.
size_t trailing_space_start(std::string_view text) {
  size_t start = text.size();
  while (start > 0) {
    size_t prev = start - 1;
    while (prev > 0 && (uint8_t(text[prev]) & 0xc0) == 0x80) --prev;
    if (!is_white_space(code_point_at(text, prev))) break;
    start = prev;
  }
  return start;
}

// Length of the whitespace run that starts `text`.
size_t leading_space_length(std::string_view text) {
  size_t len = 0;
  while (len < text.size() && is_white_space(code_point_at(text, len))) len += utf8_char_length(uint8_t(text[len]));
  return len;
}

}  // namespace

void AddedTokenSplitter::add(std::string pattern, const AddedToken& token) {
  if (pattern.empty()) return;  // an empty token can never be matched
  const uint8_t first = uint8_t(pattern[0]);
  entries_.push_back({std::move(pattern), token.id, token.lstrip, token.rstrip, token.single_word});
  auto& bucket = by_first_byte_[first];
  bucket.push_back(uint32_t(entries_.size() - 1));
  std::stable_sort(bucket.begin(), bucket.end(),
                   [&](uint32_t a, uint32_t b) { return entries_[a].pattern.size() > entries_[b].pattern.size(); });
}

std::vector<AddedTokenSplitter::Piece> AddedTokenSplitter::split(std::string_view text) const {
  std::vector<Piece> pieces;
  size_t done = 0;  // text before this is already in `pieces`
  size_t pos = 0;
  while (pos < text.size()) {
    const Entry* match = nullptr;
    for (const uint32_t index : by_first_byte_[uint8_t(text[pos])]) {
      if (text.substr(pos).starts_with(entries_[index].pattern)) {
        match = &entries_[index];
        break;
      }
    }
    if (!match) {
      ++pos;
      continue;
    }
    size_t begin = pos, end = pos + match->pattern.size();
    pos = end;  // a rejected match is consumed too, as in Hugging Face's Aho-Corasick scan
    if (match->single_word && ((begin > 0 && ends_with_word(text.substr(0, begin))) ||
                               (end < text.size() && starts_with_word(text.substr(end)))))
      continue;
    if (match->lstrip) begin = std::max(trailing_space_start(text.substr(0, begin)), done);
    if (match->rstrip) end += leading_space_length(text.substr(end));
    if (begin > done) pieces.push_back({text.substr(done, begin - done), -1});
    pieces.push_back({text.substr(begin, end - begin), match->id});
    done = pos = end;
  }
  if (done < text.size()) pieces.push_back({text.substr(done), -1});
  return pieces;
}

}  // namespace nibble::tokenizer
