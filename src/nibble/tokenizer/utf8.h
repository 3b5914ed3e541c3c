// UTF-8 helpers the tokenizer needs beyond validation (io/text_file.h's find_invalid_utf8):
// walking characters, White_Space, GPT-2's byte<->character map and Rust's lossy decoding.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace nibble::tokenizer {

// Length of the character whose first byte is `lead`; only meaningful on valid UTF-8.
inline size_t utf8_char_length(unsigned char lead) {
  return lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
}

// The code point starting at byte `i` of valid UTF-8 text.
uint32_t code_point_at(std::string_view text, size_t i);

void append_utf8(std::string& out, uint32_t code_point);

// Unicode White_Space, the set Rust's char::is_whitespace and regex `\s` use.
bool is_white_space(uint32_t code_point);

// GPT-2's ByteLevel alphabet: every byte is shown as a printable character (space -> "Ġ").
const std::string& byte_to_char(uint8_t byte);
// The byte a ByteLevel character stands for, or -1 for characters outside the alphabet.
int char_to_byte(uint32_t code_point);

// Appends `bytes` as Rust's String::from_utf8_lossy does: each maximal invalid subsequence
// becomes one U+FFFD.
void append_utf8_lossy(std::string& out, std::string_view bytes);

inline constexpr std::string_view kReplacementChar = "\xef\xbf\xbd";  // U+FFFD

}  // namespace nibble::tokenizer
