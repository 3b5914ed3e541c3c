#include "nibble/tokenizer/utf8.h"

#include <array>

namespace nibble::tokenizer {

uint32_t code_point_at(std::string_view text, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data()) + i;
  switch (utf8_char_length(p[0])) {
    case 1: return p[0];
    case 2: return (uint32_t(p[0] & 0x1f) << 6) | (p[1] & 0x3f);
    case 3: return (uint32_t(p[0] & 0x0f) << 12) | (uint32_t(p[1] & 0x3f) << 6) | (p[2] & 0x3f);
    default:
      return (uint32_t(p[0] & 0x07) << 18) | (uint32_t(p[1] & 0x3f) << 12) | (uint32_t(p[2] & 0x3f) << 6) |
             (p[3] & 0x3f);
  }
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xc0 | (cp >> 6));
    out += char(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += char(0xe0 | (cp >> 12));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  } else {
    out += char(0xf0 | (cp >> 18));
    out += char(0x80 | ((cp >> 12) & 0x3f));
    out += char(0x80 | ((cp >> 6) & 0x3f));
    out += char(0x80 | (cp & 0x3f));
  }
}

bool is_white_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
         cp == 0x3000;
}

namespace {

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 bytes
// are mapped in order to U+0100, U+0101, ...
struct ByteLevelAlphabet {
  std::array<std::string, 256> char_of_byte;
  std::array<int16_t, 0x144> byte_of_char;  // the alphabet ends at U+0143

  ByteLevelAlphabet() {
    byte_of_char.fill(-1);
    uint32_t next_extra = 0x100;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
      const uint32_t cp = printable ? uint32_t(b) : next_extra++;
      append_utf8(char_of_byte[b], cp);
      byte_of_char[cp] = int16_t(b);
    }
  }
};

const ByteLevelAlphabet& alphabet() {
  static const ByteLevelAlphabet instance;
  return instance;
}

}  // namespace

const std::string& byte_to_char(uint8_t byte) { return alphabet().char_of_byte[byte]; }

int char_to_byte(uint32_t cp) { return cp < alphabet().byte_of_char.size() ? alphabet().byte_of_char[cp] : -1; }

void append_utf8_lossy(std::string& out, std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char lead = p[i];
    size_t width = 0;
    unsigned char lo = 0x80, hi = 0xbf;  // the allowed range of the second byte
    if (lead < 0x80) width = 1;
    else if (lead >= 0xc2 && lead <= 0xdf) width = 2;
    else if (lead >= 0xe0 && lead <= 0xef) {
      width = 3;
      if (lead == 0xe0) lo = 0xa0;  // no overlongs
      if (lead == 0xed) hi = 0x9f;  // no surrogates
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      width = 4;
      if (lead == 0xf0) lo = 0x90;
      if (lead == 0xf4) hi = 0x8f;  // nothing past U+10FFFF
    }
    if (width == 0) {  // a byte that never starts a character
      out += kReplacementChar;
      ++i;
      continue;
    }
    // Accept continuation bytes while they fit; a sequence that stops early is one U+FFFD.
    size_t k = 1;
    while (k < width && i + k < n) {
      const unsigned char c = p[i + k];
      const bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xbf);
      if (!ok) break;
      ++k;
    }
    if (k == width) out.append(bytes.substr(i, width));
    else out += kReplacementChar;
    i += k;
  }
}

}  // namespace nibble::tokenizer
