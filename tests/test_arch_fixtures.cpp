// Architecture features no real checkpoint here has (Llama-3 RoPE scaling, Mistral, Qwen2
// biases, Mixtral experts, untied heads), against tiny random-weight Hugging Face fixtures
// made by tools/make_fixtures.py (tests/fixtures/README.md).
#include <algorithm>
#include <cmath>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

std::vector<int32_t> load_ids(const Checkpoint& ref, const std::string& name) {
  const TensorInfo& t = ref.get(name);
  const auto* p = reinterpret_cast<const int32_t*>(t.data);
  return std::vector<int32_t>(p, p + t.numel());
}

class ArchFixture : public ::testing::TestWithParam<const char*> {};

TEST_P(ArchFixture, LogitsMatchTransformers) {
  const auto dir = test::source_dir() / "tests/fixtures" / GetParam();
  auto model = Model::load(dir);
  const Checkpoint ref = Checkpoint::open(dir / "reference.safetensors");
  const std::vector<int32_t> ids = load_ids(ref, "input_ids");
  const std::vector<float> expected = ref.load_f32("logits");
  auto cache = model->new_cache(int64_t(ids.size()));
  const Step step{cache.get(), ids, true};
  const std::vector<float> got = model->forward({&step, 1});
  ASSERT_EQ(got.size(), expected.size());
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(double(got[i]) - expected[i]));
    max_ref = std::max(max_ref, std::abs(double(expected[i])));
  }
  std::printf("%s: max |delta| / max |ref| = %.3g\n", GetParam(), max_diff / max_ref);
  EXPECT_LE(max_diff / max_ref, 1e-4);
}

// Greedy decoding through the KV cache, token by token, as transformers' generate() did.
TEST_P(ArchFixture, GreedyDecodeMatchesTransformers) {
  const auto dir = test::source_dir() / "tests/fixtures" / GetParam();
  auto model = Model::load(dir);
  const Checkpoint ref = Checkpoint::open(dir / "reference.safetensors");
  const std::vector<int32_t> ids = load_ids(ref, "input_ids");
  const std::vector<int32_t> expected = load_ids(ref, "greedy_ids");
  auto cache = model->new_cache(64);
  std::vector<int32_t> feed(ids.begin(), ids.begin() + 8), got;
  for (size_t i = 0; i < expected.size(); ++i) {
    const Step step{cache.get(), feed, false};
    const std::vector<float> logits = model->forward({&step, 1});
    const int32_t next = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    got.push_back(next);
    feed = {next};
  }
  EXPECT_EQ(got, expected);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ArchFixture, ::testing::Values("llama3-rope", "mistral", "qwen2", "mixtral"));

TEST(ArchConfig, ParsesTransformers5Configs) {
  const auto c = ModelConfig::from_file(test::source_dir() / "tests/fixtures/llama3-rope/config.json");
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{2, 3}));
  EXPECT_FALSE(c.tie_word_embeddings);
  const auto q = ModelConfig::from_file(test::source_dir() / "tests/fixtures/qwen2/config.json");
  EXPECT_TRUE(q.attention_bias);
  EXPECT_EQ(q.sliding_window, 0);
  const auto x = ModelConfig::from_file(test::source_dir() / "tests/fixtures/mixtral/config.json");
  EXPECT_EQ(x.head_dim, 16);  // null head_dim falls back to hidden / heads
  EXPECT_EQ(x.num_experts, 4);
}

TEST(ArchConfig, UnknownArchitectureIsNamed) {
  nlohmann::json j = {{"architectures", {"GPT2LMHeadModel"}}};
  try {
    ModelConfig::from_json(j, "config.json");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("GPT2LMHeadModel"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nibble
