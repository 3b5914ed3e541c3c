#include "nibble/tokenizer/bpe.h"

#include <algorithm>
#include <limits>

#include "nibble/core/error.h"
#include "nibble/tokenizer/utf8.h"

namespace nibble::tokenizer {

namespace {

// A merge is written "left right" (older files) or ["left", "right"] (newer ones).
std::pair<std::string, std::string> parse_merge(const JsonNode& merge) {
  if (merge.is_array()) {
    if (merge.array().size() != 2) merge.fail(fmt::format("a merge has two parts, this has {}", merge.array().size()));
    return {merge.at(size_t(0)).string(), merge.at(size_t(1)).string()};
  }
  const std::string text = merge.string();
  const size_t space = text.find(' ');
  if (space == std::string::npos || space == 0 || space + 1 == text.size())
    merge.fail(fmt::format("merge '{}' is not two tokens separated by a space", text));
  return {text.substr(0, space), text.substr(space + 1)};
}

// Options that change tokenization but that no Llama-family tokenizer.json sets: refuse them
// rather than silently tokenize differently from Hugging Face.
void reject_unsupported_options(const JsonNode& model) {
  if (const auto dropout = model.find("dropout"); dropout && dropout->number() != 0.0)
    dropout->fail("BPE dropout (randomized merging for training) is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (const auto affix = model.find(key); affix && !affix->string().empty())
      affix->fail("BPE word prefixes/suffixes are not supported");
  }
}

constexpr std::string_view kMetaspace = "\xe2\x96\x81";  // "▁", SentencePiece's word marker

// Where the next "▁" that follows another character starts, or npos.
size_t find_metaspace_after_other_char(std::string_view text, size_t from) {
  for (size_t pos = text.find(kMetaspace, std::max<size_t>(from, 1)); pos != std::string_view::npos;
       pos = text.find(kMetaspace, pos + kMetaspace.size())) {
    if (text.substr(0, pos).ends_with(kMetaspace)) continue;
    return pos;
  }
  return std::string_view::npos;
}

bool has_metaspace_after_other_char(std::string_view token) {
  return find_metaspace_after_other_char(token, 0) != std::string_view::npos;
}

constexpr size_t kMaxCachedWordBytes = 64;

}  // namespace

BpeModel BpeModel::parse(const JsonNode& model) {
  reject_unsupported_options(model);
  BpeModel bpe;
  bpe.fuse_unk_ = model.boolean_or("fuse_unk", false);
  bpe.byte_fallback_ = model.boolean_or("byte_fallback", false);
  bpe.ignore_merges_ = model.boolean_or("ignore_merges", false);

  const JsonNode vocab = model.at("vocab");
  std::unordered_map<int32_t, std::string_view> token_of_id;
  bpe.vocab_.reserve(vocab.object().size());
  token_of_id.reserve(vocab.object().size());
  for (const auto& [token, id_value] : vocab.object().items()) {
    const JsonNode id_node(id_value, fmt::format("{}['{}']", vocab.path(), token), vocab.where());
    const int64_t id = id_node.integer();
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) id_node.fail(fmt::format("token id {} is out of range", id));
    const auto it = bpe.vocab_.emplace(token, int32_t(id)).first;
    const auto [other, fresh] = token_of_id.emplace(int32_t(id), it->first);
    if (!fresh) id_node.fail(fmt::format("id {} is also given to '{}'", id, other->second));
  }

  if (const auto unk = model.find("unk_token")) {
    const std::string unk_token = unk->string();
    const auto id = bpe.find(unk_token);
    if (!id) unk->fail(fmt::format("unk_token '{}' is not in the vocab", unk_token));
    bpe.unk_id_ = *id;
  }
  bpe.cut_before_metaspace_ = bpe.find(kMetaspace).has_value() &&
                              std::none_of(bpe.vocab_.begin(), bpe.vocab_.end(), [](const auto& entry) {
                                return has_metaspace_after_other_char(entry.first);
                              });
  for (int b = 0; b < 256; ++b) bpe.byte_ids_[b] = bpe.find(fmt::format("<0x{:02X}>", b)).value_or(-1);

  const JsonNode merges = model.at("merges");
  const size_t n_merges = merges.array().size();
  bpe.merges_.reserve(n_merges);
  for (size_t rank = 0; rank < n_merges; ++rank) {
    const JsonNode merge = merges.at(rank);
    const auto [left, right] = parse_merge(merge);
    const auto left_id = bpe.find(left), right_id = bpe.find(right), merged_id = bpe.find(left + right);
    if (!left_id) merge.fail(fmt::format("'{}' is not in the vocab", left));
    if (!right_id) merge.fail(fmt::format("'{}' is not in the vocab", right));
    if (!merged_id) merge.fail(fmt::format("the merged token '{}' is not in the vocab", left + right));
    // A pair listed twice keeps its last rank, as Hugging Face's merge map does.
    bpe.merges_[pair_key(*left_id, *right_id)] = Merge{int32_t(rank), *merged_id};
  }
  return bpe;
}

std::optional<int32_t> BpeModel::find(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const BpeModel::Merge* BpeModel::find_merge(int32_t left, int32_t right) const {
  const auto it = merges_.find(pair_key(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

std::vector<BpeModel::Symbol> BpeModel::split_into_symbols(std::string_view word) const {
  std::vector<int32_t> ids;
  ids.reserve(word.size());
  bool pending_unk = false;  // an unk not yet emitted, so that a run of unknowns can fuse
  auto flush_unk = [&] {
    if (pending_unk) ids.push_back(unk_id_);
    pending_unk = false;
  };
  for (size_t i = 0; i < word.size();) {
    const std::string_view ch = word.substr(i, utf8_char_length(static_cast<unsigned char>(word[i])));
    i += ch.size();
    if (const auto id = find(ch)) {
      flush_unk();
      ids.push_back(*id);
    } else if (byte_fallback_ && std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_ids_[uint8_t(c)] >= 0; })) {
      flush_unk();
      for (const char c : ch) ids.push_back(byte_ids_[uint8_t(c)]);
    } else if (unk_id_ >= 0) {
      if (!fuse_unk_) flush_unk();
      pending_unk = true;
    }
  }
  flush_unk();

  std::vector<Symbol> symbols(ids.size());
  for (size_t i = 0; i < ids.size(); ++i)
    symbols[i] = Symbol{ids[i], int32_t(i) - 1, i + 1 < ids.size() ? int32_t(i + 1) : -1};
  return symbols;
}

void BpeModel::merge_symbols(std::vector<Symbol>& symbols) const {
  // Candidates are ordered by (rank, position): the lowest rank first, the leftmost on ties.
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t merged_id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<Candidate> queue;
  queue.reserve(symbols.size());
  auto push_candidate = [&](int32_t pos) {
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    if (const Merge* m = find_merge(symbols[pos].id, symbols[next].id)) {
      queue.push_back({m->rank, pos, m->merged_id});
      std::push_heap(queue.begin(), queue.end(), std::greater<>());
    }
  };
  for (int32_t pos = 0; pos + 1 < int32_t(symbols.size()); ++pos) {
    if (const Merge* m = find_merge(symbols[pos].id, symbols[pos + 1].id)) queue.push_back({m->rank, pos, m->merged_id});
  }
  std::make_heap(queue.begin(), queue.end(), std::greater<>());

  while (!queue.empty()) {
    std::pop_heap(queue.begin(), queue.end(), std::greater<>());
    const Candidate top = queue.back();
    queue.pop_back();
    Symbol& left = symbols[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    // Stale when either side has merged since the candidate was queued.
    const Merge* m = find_merge(left.id, symbols[left.next].id);
    if (!m || m->merged_id != top.merged_id) continue;

    Symbol& right = symbols[left.next];
    left.id = top.merged_id;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    right.id = -1;
    if (left.prev >= 0) push_candidate(left.prev);
    push_candidate(top.pos);
  }
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  std::vector<Symbol> symbols = split_into_symbols(word);
  merge_symbols(symbols);
  for (const Symbol& s : symbols) {
    if (s.id >= 0) out.push_back(s.id);
  }
}

const std::vector<int32_t>* BpeModel::WordCache::find(std::string_view word) const {
  const auto it = ids_.find(word);
  return it == ids_.end() ? nullptr : &it->second;
}

void BpeModel::WordCache::add(std::string_view word, std::vector<int32_t> ids) { ids_.emplace(word, std::move(ids)); }

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out, WordCache& cache) const {
  if (ignore_merges_) {
    if (const auto id = find(word)) {
      out.push_back(*id);
      return;
    }
  }
  size_t begin = 0;
  while (begin < word.size()) {
    const size_t cut = cut_before_metaspace_ ? find_metaspace_after_other_char(word, begin + 1) : std::string_view::npos;
    const std::string_view part = word.substr(begin, cut == std::string_view::npos ? std::string_view::npos : cut - begin);
    begin += part.size();
    if (part.size() > kMaxCachedWordBytes) {
      merge_word(part, out);
    } else if (const auto* cached = cache.find(part)) {
      out.insert(out.end(), cached->begin(), cached->end());
    } else {
      std::vector<int32_t> ids;
      merge_word(part, ids);
      out.insert(out.end(), ids.begin(), ids.end());
      cache.add(part, std::move(ids));
    }
  }
}

}  // namespace nibble::tokenizer
