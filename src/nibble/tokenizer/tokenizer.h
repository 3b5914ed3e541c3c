// Hugging Face tokenizer.json, encoded and decoded exactly as the `tokenizers` library does, for
// the two Llama-family kinds:
//  - SentencePiece-style BPE with byte fallback (Llama-2, Mistral, TinyStories): normalizer
//    Prepend("▁") + Replace(" " -> "▁"), the whole text one BPE word, unknown characters as
//    <0xXX> pieces; decoder ▁ -> space, bytes reassembled, the leading space stripped.
//  - Byte-level BPE (Llama-3, Qwen2): a regex Split pre-tokenizer (PCRE2, Unicode properties),
//    GPT-2's byte<->character map, merges per word.
// Added/special tokens in the text are matched first, as Hugging Face does. The pipeline is read
// from the JSON; a component type nibble does not implement is refused at load with its name.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace nibble {

namespace tokenizer {
struct TokenizerData;
}

// The contents of the files a tokenizer is read from, as they sit in a model folder or inside a
// packed nibble file; an empty string is a file that is absent (tokenizer.json must be there).
struct TokenizerFiles {
  std::string tokenizer_json, tokenizer_config_json, config_json, generation_config_json;
};

class Tokenizer {
 public:
  // `path` is a tokenizer.json file or a model directory holding one. BOS/EOS come from
  // tokenizer_config.json (bos_token, eos_token, add_bos_token, add_eos_token), config.json
  // (bos_token_id, eos_token_id) and generation_config.json (eos_token_id) beside it.
  // Throws nibble::Error on malformed input.
  static Tokenizer load(const std::filesystem::path& path);
  // The same from memory; errors name `where`/<file name> (`where`: the folder or packed file).
  static Tokenizer from_files(const TokenizerFiles& files, const std::filesystem::path& where);
  // Parses tokenizer.json text alone (no BOS/EOS configuration); `where` names it in errors.
  static Tokenizer from_json_string(std::string_view json, const std::string& where);

  // `add_bos`: add the special tokens Hugging Face's add_special_tokens=True adds, i.e. the
  // post_processor's template (BOS for Llama-2/Mistral; nothing for the original Llama-3 file,
  // whose post_processor is plain ByteLevel), overridden by add_bos_token/add_eos_token in
  // tokenizer_config.json when present. Throws nibble::Error naming the byte offset when `text`
  // is not valid UTF-8.
  std::vector<int32_t> encode(std::string_view text, bool add_bos = false) const;
  // Throws nibble::Error for an id outside the vocab. Invalid byte sequences decode to U+FFFD.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  std::string piece(int32_t id) const;  // the raw vocab string ("▁the", "<0x0A>", "Ġthe", "<s>")
  int32_t vocab_size() const;            // the largest id + 1
  int32_t bos_id() const;                // -1 if none
  std::vector<int32_t> eos_ids() const;
  bool is_special(int32_t id) const;

 private:
  friend class StreamDecoder;
  explicit Tokenizer(std::shared_ptr<const tokenizer::TokenizerData> data) : data_(std::move(data)) {}
  std::string decode_window(std::span<const int32_t> ids, bool skip_special, bool continues_text) const;
  size_t open_byte_run(std::span<const int32_t> ids, bool skip_special) const;

  std::shared_ptr<const tokenizer::TokenizerData> data_;  // immutable: copies are cheap, threads share it
};

// Incremental decoding for streaming: push ids as they are generated, get back only text that
// later ids cannot change, never half a character. The concatenation of every push() and the
// final flush() equals tokenizer.decode(all ids).
class StreamDecoder {
 public:
  // `continues_text`: the ids continue text already shown (generate's prompt), so the leading
  // space a SentencePiece decoder strips at the start of a text is kept.
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false, bool continues_text = false);
  std::string push(int32_t id);
  std::string flush();  // the rest, including incomplete characters (as U+FFFD); then resets

 private:
  Tokenizer tokenizer_;
  bool skip_special_;
  std::vector<int32_t> window_;  // ids since the last point where all text was final
  size_t emitted_ = 0;           // bytes of decode(window_) already returned
  bool continues_text_;
  bool at_start_;                // the window starts the text (a leading-space Strip applies)
};

}  // namespace nibble
