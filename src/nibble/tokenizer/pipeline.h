// The stages of tokenizer.json around the model: normalizer, pre-tokenizer, decoder and
// post-processor. Each parses its section and implements the Hugging Face semantics of the
// component types that Llama-family files use; any other type is refused with an error that
// names it, so a file we cannot follow exactly never loads.
//
//   normalizer      Sequence, Prepend, Replace                     (Llama-2, Mistral)
//   pre_tokenizer   Sequence, Split (Isolated), ByteLevel          (Llama-3, Qwen2)
//   decoder         Sequence, Replace, ByteFallback, Fuse, Strip   (Llama-2, Mistral)
//                   ByteLevel                                      (Llama-3, Qwen2)
//   post_processor  TemplateProcessing, ByteLevel, Sequence
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "nibble/tokenizer/json_node.h"
#include "nibble/tokenizer/regex.h"

namespace nibble::tokenizer {

// A Split/Replace pattern: {"String": literal} or {"Regex": pattern}.
class Pattern {
 public:
  static Pattern parse(const JsonNode& node);
  static Pattern regex(const std::string& pattern, std::string where, std::string label);
  std::vector<Span> find_all(std::string_view text) const;
  std::string replace_all(std::string_view text, std::string_view content) const;

 private:
  std::string literal_;
  std::optional<Regex> regex_;
};

class Normalizer {
 public:
  static Normalizer parse(const std::optional<JsonNode>& node);  // nullopt: no normalizer
  std::string apply(std::string_view text) const;

 private:
  struct Prepend { std::string prefix; };
  struct Replace { Pattern pattern; std::string content; };
  struct Nfc {};  // Unicode canonical composition (ICU), as Hugging Face's NFC normalizer
  using Step = std::variant<Prepend, Replace, Nfc>;
  void add(const JsonNode& node);
  std::vector<Step> steps_;
};

class PreTokenizer {
 public:
  static PreTokenizer parse(const std::optional<JsonNode>& node);  // nullopt: the text is one word
  std::vector<std::string> apply(std::string_view text) const;

 private:
  // Split is a pattern; ByteLevel is the byte map, optionally after a prefix space and GPT-2's split.
  struct Step {
    bool add_prefix_space = false;  // a space before each word that does not start with one
    std::optional<Pattern> split;   // behavior Isolated: matches and gaps are all words
    bool byte_level = false;        // bytes -> GPT-2's printable alphabet
  };
  void add(const JsonNode& node);
  std::vector<Step> steps_;
};

class Decoder {
 public:
  static Decoder parse(const std::optional<JsonNode>& node);  // nullopt: tokens joined by spaces
  // `continues_text`: the tokens follow earlier decoded text (streaming), so a Strip at the start
  // of the fused text must not apply.
  std::string decode(std::vector<std::string> tokens, bool continues_text) const;
  bool has_byte_fallback() const;

 private:
  struct Replace { Pattern pattern; std::string content; };
  struct ByteFallback {};
  struct Fuse {};
  struct Strip { std::string content; size_t start; };
  struct ByteLevel {};
  using Step = std::variant<Replace, ByteFallback, Fuse, Strip, ByteLevel>;
  void add(const JsonNode& node);
  std::vector<Step> steps_;
  bool present_ = false;
};

// The special tokens add_special_tokens=true puts around a single sequence.
struct PostProcessor {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;
  static PostProcessor parse(const std::optional<JsonNode>& node);
};

// "<0x0A>" -> 0x0A: the byte a ByteFallback piece stands for, or -1.
int byte_fallback_value(std::string_view token);

}  // namespace nibble::tokenizer
