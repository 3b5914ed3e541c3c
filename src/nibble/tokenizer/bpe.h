// The BPE model of tokenizer.json: vocab, ranked merges, unknown-character handling (byte
// fallback to <0xXX> pieces or an unk token) and, for tiktoken-style vocabs, ignore_merges.
// A word is merged the way Hugging Face tokenizers does it: the pair of lowest merge rank first,
// leftmost on ties, with a priority queue over a linked list of symbols.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "nibble/tokenizer/json_node.h"

namespace nibble::tokenizer {

// Lets unordered_map<std::string, ...> be searched with a string_view without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenIds = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  // Parses tokenizer.json's "model" object; throws nibble::Error naming the bad field.
  static BpeModel parse(const JsonNode& model);

  // Remembers the ids of short words during one encode() call: text repeats its words.
  class WordCache {
   public:
    const std::vector<int32_t>* find(std::string_view word) const;
    void add(std::string_view word, std::vector<int32_t> ids);
   private:
    std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> ids_;
  };

  // Appends the ids of one pre-tokenized word.
  void encode_word(std::string_view word, std::vector<int32_t>& out, WordCache& cache) const;

  std::optional<int32_t> find(std::string_view token) const;
  const TokenIds& vocab() const { return vocab_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t merged_id;
  };
  struct Symbol {
    int32_t id;    // -1 once merged into the symbol on its left
    int32_t prev;  // index of the previous live symbol, -1 at the start
    int32_t next;  // index of the next live symbol, -1 at the end
  };

  static uint64_t pair_key(int32_t left, int32_t right) { return (uint64_t(uint32_t(left)) << 32) | uint32_t(right); }
  const Merge* find_merge(int32_t left, int32_t right) const;
  std::vector<Symbol> split_into_symbols(std::string_view word) const;
  void merge_symbols(std::vector<Symbol>& symbols) const;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  TokenIds vocab_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t byte_ids_[256];        // id of the <0xXX> piece of each byte, -1 when absent
  int32_t unk_id_ = -1;          // -1: characters without a token are dropped, as HF does
  bool fuse_unk_ = false;        // consecutive unknown characters become one unk
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;   // a word that is itself in the vocab is emitted whole
  // No token has "▁" right after another character, so no merge crosses such a point and a
  // SentencePiece-style text (one long word) can be merged piece by piece with the same result.
  bool cut_before_metaspace_ = false;
};

}  // namespace nibble::tokenizer
