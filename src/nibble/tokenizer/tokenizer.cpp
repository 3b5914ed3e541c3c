#include "nibble/tokenizer/tokenizer.h"

#include <algorithm>
#include <optional>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "nibble/core/error.h"
#include "nibble/core/json.h"
#include "nibble/io/text_file.h"
#include "nibble/tokenizer/added_tokens.h"
#include "nibble/tokenizer/bpe.h"
#include "nibble/tokenizer/json_node.h"
#include "nibble/tokenizer/pipeline.h"
#include "nibble/tokenizer/utf8.h"

namespace nibble {
namespace tokenizer {

// Everything a loaded tokenizer.json holds; immutable after loading.
struct TokenizerData {
  std::string where;
  tokenizer::BpeModel model;
  tokenizer::Normalizer normalizer;
  tokenizer::PreTokenizer pre_tokenizer;
  tokenizer::Decoder decoder;
  tokenizer::PostProcessor post_processor;
  tokenizer::AddedTokenSplitter raw_splitter;         // added tokens with normalized = false
  tokenizer::AddedTokenSplitter normalized_splitter;  // added tokens with normalized = true
  tokenizer::TokenIds added_ids;                      // content -> id of every added token

  // Per id, over the model vocab and the added tokens together.
  std::vector<std::string> pieces;
  std::vector<uint8_t> present, special, byte_piece;

  int32_t bos = -1;
  std::vector<int32_t> eos;

  void check_id(int32_t id) const {
    check(id >= 0 && id < int32_t(pieces.size()) && present[id], where, "token id {} is not in the vocab (size {})", id,
          pieces.size());
  }
  std::optional<int32_t> token_id(std::string_view token) const {
    if (const auto it = added_ids.find(token); it != added_ids.end()) return it->second;
    return model.find(token);
  }
};

}  // namespace tokenizer

using tokenizer::JsonNode;
using tokenizer::TokenizerData;

namespace {

std::vector<tokenizer::AddedToken> parse_added_tokens(const std::optional<JsonNode>& list) {
  std::vector<tokenizer::AddedToken> tokens;
  if (!list) return tokens;
  for (size_t i = 0; i < list->array().size(); ++i) {
    const JsonNode node = list->at(i);
    tokenizer::AddedToken t;
    const int64_t id = node.at("id").integer();
    if (id < 0 || id > INT32_MAX) node.fail(fmt::format("token id {} is out of range", id));
    t.id = int32_t(id);
    t.content = node.at("content").string();
    t.special = node.boolean_or("special", false);
    t.normalized = node.boolean_or("normalized", true);  // Hugging Face's default
    t.lstrip = node.boolean_or("lstrip", false);
    t.rstrip = node.boolean_or("rstrip", false);
    t.single_word = node.boolean_or("single_word", false);
    tokens.push_back(std::move(t));
  }
  return tokens;
}

// Fills the per-id tables from the model vocab and the added tokens.
void build_id_tables(TokenizerData& t, const std::vector<tokenizer::AddedToken>& added, const JsonNode& doc) {
  int64_t max_id = -1;
  for (const auto& [token, id] : t.model.vocab()) max_id = std::max<int64_t>(max_id, id);
  for (const auto& a : added) max_id = std::max<int64_t>(max_id, a.id);
  const size_t n_tokens = t.model.vocab().size() + added.size();
  // Real vocabs are contiguous; bounding the holes bounds memory for hostile files.
  check(max_id < int64_t(2 * n_tokens + 1024), t.where, "token id {} is far beyond the {} tokens defined", max_id,
        n_tokens);
  const size_t size = size_t(max_id + 1);
  t.pieces.assign(size, std::string());
  t.present.assign(size, 0);
  t.special.assign(size, 0);
  t.byte_piece.assign(size, 0);
  for (const auto& [token, id] : t.model.vocab()) {
    t.pieces[id] = token;
    t.present[id] = 1;
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const auto& a = added[i];
    const std::string path = fmt::format("added_tokens[{}]", i);
    if (const auto in_vocab = t.model.find(a.content); in_vocab && *in_vocab != a.id)
      throw Error(t.where, fmt::format("{}: '{}' has id {} but the vocab gives it id {}", path, a.content, a.id, *in_vocab));
    if (t.present[a.id] && t.pieces[a.id] != a.content)
      throw Error(t.where, fmt::format("{}: id {} is already the token '{}'", path, a.id, t.pieces[a.id]));
    t.pieces[a.id] = a.content;
    t.present[a.id] = 1;
    t.special[a.id] = a.special;
    t.added_ids[a.content] = a.id;
    if (a.normalized) t.normalized_splitter.add(t.normalizer.apply(a.content), a);
    else t.raw_splitter.add(a.content, a);
  }
  for (size_t id = 0; id < size; ++id) t.byte_piece[id] = tokenizer::byte_fallback_value(t.pieces[id]) >= 0;
  for (const std::vector<int32_t>* ids : {&t.post_processor.prefix, &t.post_processor.suffix}) {
    for (const int32_t id : *ids) {
      if (id >= int32_t(size) || !t.present[id])
        doc.at("post_processor").fail(fmt::format("special token id {} is not in the vocab", id));
    }
  }
}

std::shared_ptr<TokenizerData> parse_tokenizer_json(std::string_view text, const std::string& where) {
  const nlohmann::json root = parse_json(text, where);
  const JsonNode doc(root, "", where);
  doc.object();
  auto t = std::make_shared<TokenizerData>();
  t->where = where;

  const JsonNode model = doc.at("model");
  if (const auto type = model.find("type")) {
    const std::string name = type->string();
    if (name != "BPE") type->fail(fmt::format("model type '{}' is not supported (supported: BPE)", name));
  } else if (!model.find("merges")) {
    model.fail("has no type");  // Hugging Face infers BPE from the merges; without them we cannot
  }
  t->model = tokenizer::BpeModel::parse(model);
  t->normalizer = tokenizer::Normalizer::parse(doc.find("normalizer"));
  t->pre_tokenizer = tokenizer::PreTokenizer::parse(doc.find("pre_tokenizer"));
  t->decoder = tokenizer::Decoder::parse(doc.find("decoder"));
  t->post_processor = tokenizer::PostProcessor::parse(doc.find("post_processor"));
  build_id_tables(*t, parse_added_tokens(doc.find("added_tokens")), doc);
  return t;
}

std::optional<nlohmann::json> parse_json_if_present(const std::string& text, const std::string& where) {
  if (text.empty()) return std::nullopt;
  return parse_json(text, where);
}

std::string read_file_if_exists(const std::filesystem::path& file) {
  return std::filesystem::exists(file) ? read_text_file(file) : std::string();
}

// tokenizer_config.json names tokens as a string or as {"content": "<s>", ...}.
std::optional<int32_t> config_token(const JsonNode& config, const char* key, const TokenizerData& t) {
  const auto node = config.find(key);
  if (!node) return std::nullopt;
  const std::string token = node->is_object() ? node->at("content").string() : node->string();
  const auto id = t.token_id(token);
  if (!id) node->fail(fmt::format("'{}' is not a token of the vocab", token));
  return id;
}

// bos_token_id / eos_token_id in config.json and generation_config.json: an id, a list, or null.
std::vector<int32_t> config_ids(const JsonNode& config, const char* key, const TokenizerData& t) {
  std::vector<int32_t> ids;
  const auto node = config.find(key);
  if (!node) return ids;
  auto add = [&](const JsonNode& value) {
    const int64_t id = value.integer();
    if (id < 0 || id >= int64_t(t.pieces.size()) || !t.present[id])
      value.fail(fmt::format("token id {} is not in the vocab", id));
    ids.push_back(int32_t(id));
  };
  if (node->is_array()) {
    for (size_t i = 0; i < node->array().size(); ++i) add(node->at(i));
  } else {
    add(*node);
  }
  return ids;
}

// add_bos_token / add_eos_token override the template, as transformers' Llama tokenizers do.
void override_template_token(std::vector<int32_t>& ids, int32_t token, bool wanted, bool at_front) {
  std::erase(ids, token);
  if (wanted) ids.insert(at_front ? ids.begin() : ids.end(), token);
}

void read_special_token_config(TokenizerData& t, const TokenizerFiles& files, const std::filesystem::path& where) {
  std::optional<int32_t> config_eos;
  const std::string config_file = (where / "tokenizer_config.json").string();
  if (const auto json = parse_json_if_present(files.tokenizer_config_json, config_file)) {
    const JsonNode config(*json, "", config_file);
    config.object();
    if (const auto bos = config_token(config, "bos_token", t)) t.bos = *bos;
    config_eos = config_token(config, "eos_token", t);
    if (config_eos) t.eos.push_back(*config_eos);
    if (const auto add_bos = config.find("add_bos_token")) {
      if (add_bos->boolean() && t.bos < 0) add_bos->fail("is true but there is no bos_token");
      if (t.bos >= 0) override_template_token(t.post_processor.prefix, t.bos, add_bos->boolean(), true);
    }
    if (const auto add_eos = config.find("add_eos_token")) {
      if (add_eos->boolean() && !config_eos) add_eos->fail("is true but there is no eos_token");
      if (config_eos) override_template_token(t.post_processor.suffix, *config_eos, add_eos->boolean(), false);
    }
  }
  for (const auto& [name, text] : {std::pair{"config.json", &files.config_json},
                                   std::pair{"generation_config.json", &files.generation_config_json}}) {
    const std::string file = (where / name).string();
    const auto json = parse_json_if_present(*text, file);
    if (!json) continue;
    const JsonNode config(*json, "", file);
    config.object();
    if (const auto bos = config_ids(config, "bos_token_id", t); t.bos < 0 && !bos.empty()) t.bos = bos.front();
    for (const int32_t id : config_ids(config, "eos_token_id", t)) {
      if (std::find(t.eos.begin(), t.eos.end(), id) == t.eos.end()) t.eos.push_back(id);
    }
  }
}

std::shared_ptr<TokenizerData> build_tokenizer(const TokenizerFiles& files, const std::string& json_where,
                                               const std::filesystem::path& where) {
  auto data = parse_tokenizer_json(files.tokenizer_json, json_where);
  read_special_token_config(*data, files, where);
  return data;
}

}  // namespace

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
  const auto file = std::filesystem::is_directory(path) ? path / "tokenizer.json" : path;
  check(std::filesystem::is_regular_file(file), file.string(), "tokenizer.json not found");
  const std::filesystem::path dir = file.parent_path();
  TokenizerFiles files{read_text_file(file), read_file_if_exists(dir / "tokenizer_config.json"),
                       read_file_if_exists(dir / "config.json"), read_file_if_exists(dir / "generation_config.json")};
  return Tokenizer(build_tokenizer(files, file.string(), dir));  // errors name the file as given
}

Tokenizer Tokenizer::from_files(const TokenizerFiles& files, const std::filesystem::path& where) {
  return Tokenizer(build_tokenizer(files, (where / "tokenizer.json").string(), where));
}

Tokenizer Tokenizer::from_json_string(std::string_view json, const std::string& where) {
  return Tokenizer(parse_tokenizer_json(json, where));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos) const {
  const TokenizerData& t = *data_;
  if (const size_t bad = find_invalid_utf8(text); bad != std::string_view::npos)
    throw Error("text to encode", fmt::format("not valid UTF-8 at byte offset {}", bad));
  std::vector<int32_t> ids;
  if (add_bos) ids = t.post_processor.prefix;
  tokenizer::BpeModel::WordCache cache;
  for (const auto& raw : t.raw_splitter.split(text)) {
    if (raw.id >= 0) {
      ids.push_back(raw.id);
      continue;
    }
    const std::string normalized = t.normalizer.apply(raw.text);
    for (const auto& piece : t.normalized_splitter.split(normalized)) {
      if (piece.id >= 0) {
        ids.push_back(piece.id);
        continue;
      }
      for (const std::string& word : t.pre_tokenizer.apply(piece.text)) t.model.encode_word(word, ids, cache);
    }
  }
  if (add_bos) ids.insert(ids.end(), t.post_processor.suffix.begin(), t.post_processor.suffix.end());
  return ids;
}

std::string Tokenizer::decode_window(std::span<const int32_t> ids, bool skip_special, bool continues_text) const {
  const TokenizerData& t = *data_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    t.check_id(id);
    if (!(skip_special && t.special[id])) tokens.push_back(t.pieces[id]);
  }
  return t.decoder.decode(std::move(tokens), continues_text);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  return decode_window(ids, skip_special, false);
}

size_t Tokenizer::open_byte_run(std::span<const int32_t> ids, bool skip_special) const {
  const TokenizerData& t = *data_;
  if (!t.decoder.has_byte_fallback()) return 0;
  size_t run_start = ids.size();
  for (size_t i = ids.size(); i-- > 0;) {
    if (skip_special && t.special[ids[i]]) continue;  // skipped tokens do not end a run
    if (!t.byte_piece[ids[i]]) break;
    run_start = i;
  }
  return ids.size() - run_start;
}

std::string Tokenizer::piece(int32_t id) const {
  data_->check_id(id);
  return data_->pieces[id];
}

int32_t Tokenizer::vocab_size() const { return int32_t(data_->pieces.size()); }
int32_t Tokenizer::bos_id() const { return data_->bos; }
std::vector<int32_t> Tokenizer::eos_ids() const { return data_->eos; }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < int32_t(data_->special.size()) && data_->special[id];
}

// ---- StreamDecoder ----

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special, bool continues_text)
    : tokenizer_(tokenizer), skip_special_(skip_special), continues_text_(continues_text), at_start_(!continues_text) {}

std::string StreamDecoder::push(int32_t id) {
  tokenizer_.data_->check_id(id);
  window_.push_back(id);
  // Text that later ids can still change is held back: an open run of <0xXX> pieces (a later
  // byte can make the run invalid) and trailing U+FFFD (possibly an incomplete character).
  const size_t open = tokenizer_.open_byte_run(window_, skip_special_);
  const std::string text =
      tokenizer_.decode_window(std::span(window_).first(window_.size() - open), skip_special_, !at_start_);
  size_t stable = text.size();
  while (stable >= 3 && text.compare(stable - 3, 3, tokenizer::kReplacementChar) == 0) stable -= 3;
  std::string out = stable > emitted_ ? text.substr(emitted_, stable - emitted_) : std::string();
  emitted_ = std::max(emitted_, stable);
  // Once everything is final, later text no longer depends on these ids. At the start of the
  // text the window is kept until it shows something, so a leading-space Strip lands correctly.
  if (open == 0 && stable == text.size() && (emitted_ > 0 || !at_start_)) {
    window_.clear();
    emitted_ = 0;
    at_start_ = false;
  }
  return out;
}

std::string StreamDecoder::flush() {
  const std::string text = tokenizer_.decode_window(window_, skip_special_, !at_start_);
  std::string out = text.size() > emitted_ ? text.substr(emitted_) : std::string();
  window_.clear();
  emitted_ = 0;
  at_start_ = !continues_text_;
  return out;
}

}  // namespace nibble
