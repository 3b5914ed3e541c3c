// The tokenizer against Hugging Face: the 3 x 95 reference cases in ../shared/data (ids from the
// JavaScript and Rust implementations), decoding, streaming, the token counts the perplexity
// protocol depends on, small hand-built tokenizer.json files for the rarer rules, and malformed
// files.
#include <chrono>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "nibble/core/error.h"
#include "nibble/io/safetensors.h"
#include "nibble/io/text_file.h"
#include "nibble/tokenizer/tokenizer.h"
#include "nibble/tokenizer/utf8.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using nlohmann::json;

struct ReferenceCase {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<int32_t> ids_with_special;
};

std::vector<ReferenceCase> load_reference(const std::string& name) {
  std::ifstream in(test::data_dir() / "tokenizers" / name / "reference.jsonl");
  std::vector<ReferenceCase> cases;
  for (std::string line; std::getline(in, line);) {
    const auto j = json::parse(line);
    cases.push_back({j["text"], j["ids"], j["ids_with_special"]});
  }
  return cases;
}

Tokenizer load_tokenizer(const std::string& name) { return Tokenizer::load(test::data_dir() / "tokenizers" / name); }

bool is_valid_utf8(std::string_view s) { return find_invalid_utf8(s) == std::string_view::npos; }

// Pushes `ids` one by one; every chunk must be valid UTF-8 and all of them together the decode.
void expect_stream_equals_decode(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  StreamDecoder stream(tok, skip_special);
  std::string streamed;
  for (const int32_t id : ids) {
    const std::string chunk = stream.push(id);
    EXPECT_TRUE(is_valid_utf8(chunk)) << "chunk after id " << id << " is not valid UTF-8";
    streamed += chunk;
  }
  const std::string rest = stream.flush();
  EXPECT_TRUE(is_valid_utf8(rest));
  EXPECT_EQ(streamed + rest, tok.decode(ids, skip_special));
}

// What Hugging Face's decode returns for these tokenizers' encodings: the text itself, except that
// SentencePiece-style tokenizers turn a literal "▁" in the text into a space (the normalizer
// writes spaces as "▁", so the two are the same token).
std::string expected_round_trip(const std::string& name, const std::string& text) {
  if (name == "llama3") return text;
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text.compare(i, 3, "\u2581") == 0) {
      out += ' ';
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

class ReferenceTokenizer : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    NIBBLE_REQUIRE_DATA("tokenizers/" + GetParam() + "/reference.jsonl");
    tok_.emplace(load_tokenizer(GetParam()));
    cases_ = load_reference(GetParam());
    ASSERT_EQ(cases_.size(), 95u);
  }
  std::optional<Tokenizer> tok_;
  std::vector<ReferenceCase> cases_;
};

TEST_P(ReferenceTokenizer, EncodesEveryCaseLikeHuggingFace) {
  for (const auto& c : cases_) {
    SCOPED_TRACE(json(c.text).dump());
    EXPECT_EQ(tok_->encode(c.text), c.ids);
    EXPECT_EQ(tok_->encode(c.text, /*add_bos=*/true), c.ids_with_special);
  }
}

TEST_P(ReferenceTokenizer, DecodesEveryCaseLikeHuggingFace) {
  for (const auto& c : cases_) {
    SCOPED_TRACE(json(c.text).dump());
    EXPECT_EQ(tok_->decode(c.ids), expected_round_trip(GetParam(), c.text));
    EXPECT_EQ(tok_->decode(c.ids_with_special, /*skip_special=*/true), tok_->decode(c.ids, true));
  }
}

TEST_P(ReferenceTokenizer, StreamingEqualsDecode) {
  for (const auto& c : cases_) {
    SCOPED_TRACE(json(c.text).dump());
    expect_stream_equals_decode(*tok_, c.ids_with_special, false);
    expect_stream_equals_decode(*tok_, c.ids_with_special, true);
  }
}

// Random id sequences reach what encodings never produce: broken byte runs, lone UTF-8 lead
// bytes, special tokens between bytes.
TEST_P(ReferenceTokenizer, StreamingEqualsDecodeOnRandomIds) {
  std::mt19937 rng(1234);
  const int32_t vocab = tok_->vocab_size();
  // Ids of single-byte pieces: <0xXX> (SentencePiece) or one ByteLevel character.
  std::vector<int32_t> byte_ids;
  for (int32_t id = 0; id < vocab; ++id) {
    const std::string p = tok_->piece(id);
    if ((p.size() == 6 && p.starts_with("<0x")) || (p.size() <= 2 && tokenizer::char_to_byte(tokenizer::code_point_at(p, 0)) >= 0 &&
                                                    tokenizer::utf8_char_length(uint8_t(p[0])) == p.size()))
      byte_ids.push_back(id);
  }
  ASSERT_GE(byte_ids.size(), 256u);
  std::vector<int32_t> special_ids;
  for (int32_t id = 0; id < vocab; ++id) {
    if (tok_->is_special(id)) special_ids.push_back(id);
  }
  for (int round = 0; round < 300; ++round) {
    std::vector<int32_t> ids(1 + rng() % 12);
    for (int32_t& id : ids) {
      const unsigned pick = rng() % 10;
      id = pick < 6 ? byte_ids[rng() % byte_ids.size()] : pick < 8 ? special_ids[rng() % special_ids.size()] : int32_t(rng() % vocab);
    }
    expect_stream_equals_decode(*tok_, ids, false);
    expect_stream_equals_decode(*tok_, ids, true);
  }
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, ReferenceTokenizer, ::testing::Values("llama2", "mistral", "llama3"));

// Qwen3's real tokenizer declares an NFC normalizer: its 110 reference texts (the 95 above plus
// decomposed accents, Hangul jamo, the Ångström and Ohm signs, stacked marks, a ChatML turn) encode
// as Hugging Face's Rust tokenizers does, and a decomposed text encodes as its composed form.
TEST(Tokenizer, Qwen3NfcNormalizerMatchesHuggingFace) {
  NIBBLE_REQUIRE_DATA("tokenizers/qwen3/reference.jsonl");
  const Tokenizer qwen3 = load_tokenizer("qwen3");
  std::ifstream in(test::data_dir() / "tokenizers/qwen3/reference.jsonl");
  int cases = 0;
  for (std::string line; std::getline(in, line); ++cases) {
    const auto j = json::parse(line);
    SCOPED_TRACE(j["text"].dump());
    EXPECT_EQ(qwen3.encode(j["text"].get<std::string>()), j["ids"].get<std::vector<int32_t>>());
  }
  EXPECT_EQ(cases, 110);
  const std::string composed = "caf\u00e9 \u00c5ngstr\u00f6m", decomposed = "cafe\u0301 A\u030angstro\u0308m";
  ASSERT_NE(composed, decomposed);
  EXPECT_EQ(qwen3.encode(decomposed), qwen3.encode(composed));
  EXPECT_EQ(qwen3.decode(qwen3.encode(decomposed)), composed);
  // Ohm sign U+2126 is canonically the Greek capital omega U+03A9.
  EXPECT_EQ(qwen3.encode("\u2126"), qwen3.encode("\u03a9"));
}

TEST(Tokenizer, SpecialTokensAndConfig) {
  NIBBLE_REQUIRE_DATA("tokenizers/llama3/tokenizer.json");
  const Tokenizer llama2 = load_tokenizer("llama2");
  EXPECT_EQ(llama2.vocab_size(), 32000);
  EXPECT_EQ(llama2.bos_id(), 1);
  EXPECT_EQ(llama2.eos_ids(), std::vector<int32_t>{2});
  EXPECT_EQ(llama2.piece(13), "<0x0A>");
  EXPECT_EQ(llama2.piece(15043), "\u2581Hello");
  EXPECT_TRUE(llama2.is_special(1));
  EXPECT_FALSE(llama2.is_special(13));
  EXPECT_FALSE(llama2.is_special(-1));
  EXPECT_THROW(llama2.piece(32000), Error);
  EXPECT_THROW(llama2.decode(std::vector<int32_t>{5, -3}), Error);

  const Tokenizer llama3 = load_tokenizer("llama3");
  EXPECT_EQ(llama3.vocab_size(), 128256);
  EXPECT_EQ(llama3.bos_id(), 128000);
  EXPECT_EQ(llama3.eos_ids(), std::vector<int32_t>{128001});
  EXPECT_EQ(llama3.piece(40), "I");
  EXPECT_TRUE(llama3.is_special(128009));

  // A file path and its directory load the same tokenizer, with the directory's config.
  const Tokenizer by_file = Tokenizer::load(test::data_dir() / "tokenizers/llama2/tokenizer.json");
  EXPECT_EQ(by_file.bos_id(), 1);
  EXPECT_EQ(by_file.encode("Hello world", true), llama2.encode("Hello world", true));
}

// Special tokens are cut out of the text before the normalizer runs, so Llama-2's "legacy"
// normalizer puts a "▁" at the start of each piece, and decoding keeps the space that brings.
TEST(Tokenizer, LegacySpecialTokensInText) {
  NIBBLE_REQUIRE_DATA("tokenizers/llama2/tokenizer.json");
  const Tokenizer tok = load_tokenizer("llama2");
  const std::vector<int32_t> ids = tok.encode("<s>Hello</s>");
  EXPECT_EQ(ids, (std::vector<int32_t>{1, 15043, 2}));
  EXPECT_EQ(tok.decode(ids), "<s> Hello</s>");
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), "Hello");
}

TEST(Tokenizer, InvalidUtf8NamesTheByteOffset) {
  NIBBLE_REQUIRE_DATA("models/stories260K/tokenizer.json");
  const Tokenizer tok = Tokenizer::load(test::data_dir() / "models/stories260K");
  for (const auto& [text, offset] : std::vector<std::pair<std::string, int>>{
           {"abc\xff", 3}, {"h\xc3", 1}, {"ok \xed\xa0\x80", 3}, {"\xc0\xaf", 0}}) {
    try {
      tok.encode(text);
      ADD_FAILURE() << "no error for invalid UTF-8";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fmt::format("byte offset {}", offset)), std::string::npos) << e.what();
    }
  }
}

TEST(Tokenizer, Stories260KMatchesReferenceInputIds) {
  NIBBLE_REQUIRE_DATA("models/stories260K/reference_logits.safetensors");
  const Tokenizer tok = Tokenizer::load(test::data_dir() / "models/stories260K");
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  const Checkpoint reference = Checkpoint::open(test::data_dir() / "models/stories260K/reference_logits.safetensors");
  const TensorInfo& input_ids = reference.get("input_ids");
  ASSERT_EQ(input_ids.dtype, DType::I64);
  std::vector<int32_t> expected;
  for (int64_t i = 0; i < input_ids.numel(); ++i) expected.push_back(int32_t(reinterpret_cast<const int64_t*>(input_ids.data)[i]));
  const auto text = read_text_file(test::data_dir() / "text/tinystories_valid_sample.txt");
  std::vector<int32_t> ids = tok.encode(text, true);
  ids.resize(expected.size());
  EXPECT_EQ(ids, expected);
}

// The count every WikiText-2 perplexity number rests on, and the speed of a long SentencePiece text
// (one BPE word of 1.3 MB for Hugging Face).
TEST(Tokenizer, WikiText2TokenCount) {
  NIBBLE_REQUIRE_DATA("text/wikitext2_test_gptq_join.txt");
  const Tokenizer tok = load_tokenizer("llama2");
  const std::string text = read_text_file(test::data_dir() / "text/wikitext2_test_gptq_join.txt");
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int32_t> ids = tok.encode(text, true);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("wikitext2 test (llama2): %zu bytes -> %zu tokens incl. BOS in %.3f s (%.1f MB/s)\n", text.size(),
              ids.size(), seconds, text.size() / seconds / 1e6);
  EXPECT_EQ(ids.size(), 341469u);
  // The first 64 ids of models/nibble-ref/reference_logits.safetensors (REFERENCE.md).
  const std::vector<int32_t> head = {
      1,     29871, 13,    13,    353,   4755,  350,   5059,  357,   353,   29871, 13,    13,    13,    13,    13,
      4755,  350,   5059,  357,   338,   385,   4223,  2706,  1919,  11456, 322,   24520, 11339, 869,   940,   750,
      263,   17838, 732,   29899, 29992, 380,   23693, 6297,  373,   278,   11456, 3652,  450,   6682,  297,   29871,
      29906, 29900, 29900, 29900, 869,   910,   471,   5643,  491,   263,   380,   23693, 6297,  297,   278,   1708};
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + 64), head);
  EXPECT_EQ(tok.decode(std::span(ids).subspan(1)), text);
}

// ---- small hand-built tokenizer.json files ----

// SentencePiece-style: Prepend + Replace, byte fallback for é only, unk for the rest.
json sentencepiece_json() {
  return json::parse(R"({
    "added_tokens": [
      {"id": 0, "content": "<unk>", "special": true, "normalized": false},
      {"id": 1, "content": "<s>", "special": true, "normalized": false},
      {"id": 11, "content": "<x>", "special": false, "normalized": false, "lstrip": true, "rstrip": true},
      {"id": 12, "content": "bb", "special": false, "normalized": true},
      {"id": 13, "content": "<w>", "special": false, "normalized": false, "single_word": true}
    ],
    "normalizer": {"type": "Sequence", "normalizers": [
      {"type": "Prepend", "prepend": "\u2581"},
      {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": null,
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": {"type": "Sequence", "decoders": [
      {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
      {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
      "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0xC3>": 3, "<0xA9>": 4, "\u2581": 5, "a": 6, "b": 7,
                "\u2581a": 8, "ab": 9, "\u2581ab": 10},
      "merges": ["\u2581 a", "a b", "\u2581a b"]}
  })");
}

Tokenizer from_json(const json& j) { return Tokenizer::from_json_string(j.dump(), "test.json"); }

TEST(Tokenizer, SentencePieceRules) {
  const Tokenizer tok = from_json(sentencepiece_json());
  EXPECT_EQ(tok.bos_id(), -1);  // no tokenizer_config.json beside a string
  EXPECT_EQ(tok.encode("ab"), (std::vector<int32_t>{10}));           // "▁a" first (rank 0), then "▁ab"
  EXPECT_EQ(tok.encode("ab", true), (std::vector<int32_t>{1, 10}));  // the template's BOS
  EXPECT_EQ(tok.encode("\u00e9"), (std::vector<int32_t>{5, 3, 4}));  // é -> <0xC3><0xA9>
  EXPECT_EQ(tok.encode("zzq"), (std::vector<int32_t>{5, 0}));        // no byte pieces: one fused unk
  EXPECT_EQ(tok.encode(""), std::vector<int32_t>{});
  // Byte runs decode when they are valid UTF-8, otherwise to one U+FFFD per piece.
  EXPECT_EQ(tok.decode(std::vector<int32_t>{5, 3, 4}), "\u00e9");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{6, 3, 6}), "a\ufffda");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{4, 3}), "\ufffd\ufffd");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{5, 5, 6}), " a");  // one leading space stripped
}

TEST(Tokenizer, AddedTokenRules) {
  const Tokenizer tok = from_json(sentencepiece_json());
  // lstrip/rstrip: the spaces around <x> belong to it, so "b" starts a new "▁" word.
  EXPECT_EQ(tok.encode("a <x> b"), (std::vector<int32_t>{8, 11, 5, 7}));
  // A normalized added token is matched in the normalized text, against its own normalized form
  // ("▁bb"): after a space it matches, inside a word it does not.
  EXPECT_EQ(tok.encode("a bb"), (std::vector<int32_t>{8, 12}));
  EXPECT_EQ(tok.encode("abb"), (std::vector<int32_t>{10, 7}));
  // single_word: only between non-word characters.
  EXPECT_EQ(tok.encode("a <w> a"), (std::vector<int32_t>{8, 5, 13, 5, 8}));
  const auto inside = tok.encode("a<w>");
  EXPECT_EQ(std::count(inside.begin(), inside.end(), 13), 0);
  EXPECT_EQ(tok.decode(std::vector<int32_t>{8, 11, 5, 7}), "a<x> b");
}

// Byte-level: the 256 ByteLevel characters (id = byte), "Ġa" and a whole-word token "abc" that no
// merge builds.
json byte_level_json(bool add_prefix_space, bool ignore_merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[tokenizer::byte_to_char(uint8_t(b))] = b;
  vocab["\u0120a"] = 256;
  vocab["abc"] = 257;
  return json{
      {"added_tokens", json::array({json{{"id", 258}, {"content", "<|eot|>"}, {"special", true}, {"normalized", false}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer", json{{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"use_regex", true}}},
      {"post_processor", json{{"type", "ByteLevel"}}},
      {"decoder", json{{"type", "ByteLevel"}}},
      {"model", json{{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({json::array({"\u0120", "a"})})},
                     {"ignore_merges", ignore_merges}}}};
}

TEST(Tokenizer, ByteLevelRules) {
  const Tokenizer tok = from_json(byte_level_json(true, false));
  // add_prefix_space turns "a" into "Ġa"; the GPT-2 regex splits " abc" from "!".
  EXPECT_EQ(tok.encode("a"), (std::vector<int32_t>{256}));
  EXPECT_EQ(tok.encode("abc!"), (std::vector<int32_t>{256, 'b', 'c', '!'}));
  EXPECT_EQ(tok.encode("x<|eot|>"), (std::vector<int32_t>{' ', 'x', 258}));
  EXPECT_EQ(tok.encode("x<|eot|>", true), (std::vector<int32_t>{' ', 'x', 258}));  // ByteLevel adds nothing
  // ignore_merges: a word that is itself a token is taken whole, even when no merge builds it.
  EXPECT_EQ(from_json(byte_level_json(false, true)).encode("abc"), (std::vector<int32_t>{257}));
  EXPECT_EQ(from_json(byte_level_json(false, false)).encode("abc"), (std::vector<int32_t>{'a', 'b', 'c'}));
  // Lossy UTF-8 like Rust's from_utf8_lossy: one U+FFFD per maximal invalid subsequence.
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0xc3, 0xa9}), "\u00e9");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0xc3}), "\ufffd");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0xe2, 'A'}), "\ufffdA");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0xf0, 0x9f, 0x98, 'A'}), "\ufffdA");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{0xff, 0xed, 0xa0, 0x80}), "\ufffd\ufffd\ufffd\ufffd");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{'h', 258, 'i'}), "h<|eot|>i");
  EXPECT_EQ(tok.decode(std::vector<int32_t>{'h', 258, 'i'}, true), "hi");
}

// ---- malformed tokenizer.json ----

void expect_load_error(const std::string& text, const std::string& message_part) {
  try {
    Tokenizer::from_json_string(text, "bad.json");
    ADD_FAILURE() << "no error for: " << text.substr(0, 200);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(message_part), std::string::npos)
        << "error '" << e.what() << "' does not mention '" << message_part << "'";
    EXPECT_EQ(e.where(), "bad.json");
  }
}

std::string with(json j, const json::json_pointer& at, const json& value) {
  j[at] = value;
  return j.dump();
}

TEST(Tokenizer, MalformedFilesAreErrors) {
  const json good = sentencepiece_json();
  const std::string text = good.dump();
  ASSERT_NO_THROW(from_json(good));
  expect_load_error(text.substr(0, text.size() / 2), "not valid JSON");
  expect_load_error("", "not valid JSON");
  // Found by fuzz_tokenizer: nlohmann reports a number too large for a double as out_of_range,
  // not as a parse error.
  expect_load_error(R"({"model": -222222222222222e2222222})", "not valid JSON");
  expect_load_error("[1, 2]", "expected an object");
  expect_load_error("{}", "model: missing");
  expect_load_error(with(good, "/model/type"_json_pointer, "WordPiece"), "model type 'WordPiece' is not supported");
  expect_load_error(with(good, "/model/type"_json_pointer, 7), "model.type: expected a string");
  expect_load_error(with(good, "/model/vocab"_json_pointer, json::array()), "model.vocab: expected an object");
  expect_load_error(with(good, "/model/vocab/a"_json_pointer, "6"), "expected an integer");
  expect_load_error(with(good, "/model/vocab/a"_json_pointer, -6), "out of range");
  expect_load_error(with(good, "/model/vocab/a"_json_pointer, 7), "id 7 is also given to");
  expect_load_error(with(good, "/model/vocab/a"_json_pointer, 1 << 30), "far beyond");
  expect_load_error(with(good, "/model/merges"_json_pointer, json::object()), "model.merges: expected an array");
  expect_load_error(with(good, "/model/merges/1"_json_pointer, "a c"), "model.merges[1]: 'c' is not in the vocab");
  expect_load_error(with(good, "/model/merges/1"_json_pointer, "b a"), "merged token 'ba' is not in the vocab");
  expect_load_error(with(good, "/model/merges/1"_json_pointer, "ab"), "not two tokens");
  expect_load_error(with(good, "/model/merges/1"_json_pointer, json::array({"a"})), "two parts");
  expect_load_error(with(good, "/model/unk_token"_json_pointer, "<nope>"), "unk_token '<nope>' is not in the vocab");
  expect_load_error(with(good, "/model/dropout"_json_pointer, 0.1), "dropout");
  expect_load_error(with(good, "/added_tokens/2/content"_json_pointer, 5), "added_tokens[2].content: expected a string");
  expect_load_error(with(good, "/added_tokens/2/content"_json_pointer, "ab"), "'ab' has id 11 but the vocab gives it id 9");
  expect_load_error(with(good, "/added_tokens/2/id"_json_pointer, 6), "id 6 is already the token 'a'");
  expect_load_error(with(good, "/normalizer"_json_pointer, json{{"type", "NFKD"}}), "normalizer type 'NFKD' is not supported");
  expect_load_error(with(good, "/normalizer/normalizers/0"_json_pointer, json{{"prepend", "x"}}), "normalizer.normalizers[0].type: missing");
  expect_load_error(with(good, "/pre_tokenizer"_json_pointer, json{{"type", "Metaspace"}}), "pre_tokenizer type 'Metaspace'");
  expect_load_error(with(good, "/pre_tokenizer"_json_pointer,
                         json{{"type", "Split"}, {"pattern", {{"Regex", "(["}}}, {"behavior", "Isolated"}}),
                    "regex does not compile");
  expect_load_error(with(good, "/pre_tokenizer"_json_pointer,
                         json{{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Removed"}}),
                    "Split behavior 'Removed' is not supported");
  expect_load_error(with(good, "/decoder/decoders/1/type"_json_pointer, "WordPiece"), "decoder type 'WordPiece'");
  expect_load_error(with(good, "/decoder/decoders/3/stop"_json_pointer, 1), "stop != 0");
  expect_load_error(with(good, "/decoder/decoders/3/content"_json_pointer, "ab"), "one character");
  expect_load_error(with(good, "/post_processor/special_tokens/<s>/ids/0"_json_pointer, 99), "special token id 99");
  expect_load_error(with(good, "/post_processor/type"_json_pointer, "RobertaProcessing"), "post_processor type 'RobertaProcessing'");
}

}  // namespace
}  // namespace nibble
