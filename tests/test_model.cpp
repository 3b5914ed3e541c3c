// The fp32 forward pass against Hugging Face transformers' logits on the real models in
// ../shared/data, plus incremental decoding and batching consistency.
#include <algorithm>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

struct Reference {
  std::vector<int32_t> ids;
  std::vector<float> logits;  // [T, vocab]
};

Reference load_reference(const std::filesystem::path& file) {
  const Checkpoint ref = Checkpoint::open(file);
  const TensorInfo& ids = ref.get("input_ids");
  Reference r;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (ids.dtype == DType::I64) r.ids.push_back(int32_t(reinterpret_cast<const int64_t*>(ids.data)[i]));
    else r.ids.push_back(reinterpret_cast<const int32_t*>(ids.data)[i]);
  }
  r.logits = ref.load_f32("logits");
  return r;
}

// max |ours - ref| relative to max |ref|, the acceptance measure of the foundation issue.
double relative_max_error(const std::vector<float>& got, const std::vector<float>& ref) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(double(got[i]) - double(ref[i])));
    max_ref = std::max(max_ref, std::abs(double(ref[i])));
  }
  return max_diff / max_ref;
}

void expect_matches_reference(const std::string& model_dir) {
  const auto dir = test::data_dir() / model_dir;
  auto model = Model::load(dir);
  const Reference ref = load_reference(dir / "reference_logits.safetensors");
  auto cache = model->new_cache(int64_t(ref.ids.size()));
  const Step step{cache.get(), ref.ids, true};
  const std::vector<float> logits = model->forward({&step, 1});
  ASSERT_EQ(logits.size(), ref.logits.size());
  const double err = relative_max_error(logits, ref.logits);
  ::testing::Test::RecordProperty("relative_max_error", std::to_string(err));
  std::printf("%s: max |delta| / max |ref| = %.3g\n", model_dir.c_str(), err);
  EXPECT_LE(err, 1e-4) << model_dir;
}

TEST(Model, Stories260KMatchesTransformers) {
  NIBBLE_REQUIRE_DATA("models/stories260K/reference_logits.safetensors");
  expect_matches_reference("models/stories260K");
}

TEST(Model, NibbleRefMatchesTransformers) {
  NIBBLE_REQUIRE_DATA("models/nibble-ref/reference_logits.safetensors");
  expect_matches_reference("models/nibble-ref");
}

// Feeding tokens one at a time through the KV cache, or several sequences in one batch,
// must give the logits of one full prefill.
TEST(Model, IncrementalAndBatchedDecodeMatchPrefill) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  auto model = Model::load(test::data_dir() / "models/stories260K");
  std::mt19937 rng(7);
  std::vector<int32_t> a(40), b(23);
  for (auto& t : a) t = int32_t(rng() % 512);
  for (auto& t : b) t = int32_t(rng() % 512);
  const int64_t V = model->config().vocab_size;

  auto full = [&](const std::vector<int32_t>& ids) {
    auto c = model->new_cache(64);
    const Step s{c.get(), ids, true};
    return model->forward({&s, 1});
  };
  const std::vector<float> fa = full(a), fb = full(b);

  // a: a 10-token prefill chunk then single tokens; b: interleaved in the same batches.
  auto ca = model->new_cache(64), cb = model->new_cache(64);
  std::vector<float> ga, gb;
  const Step first[] = {{ca.get(), std::span(a).first(10), true}, {cb.get(), std::span(b).first(1), true}};
  std::vector<float> out = model->forward(first);
  ga.insert(ga.end(), out.begin(), out.begin() + 10 * V);
  gb.insert(gb.end(), out.begin() + 10 * V, out.end());
  for (size_t i = 10; i < a.size(); ++i) {
    std::vector<Step> steps = {{ca.get(), std::span(a).subspan(i, 1), false}};
    const size_t j = i - 9;
    if (j < b.size()) steps.push_back({cb.get(), std::span(b).subspan(j, 1), false});
    out = model->forward(steps);
    ga.insert(ga.end(), out.begin(), out.begin() + V);
    if (j < b.size()) gb.insert(gb.end(), out.begin() + V, out.end());
  }
  EXPECT_LE(relative_max_error(ga, fa), 1e-5);
  EXPECT_LE(relative_max_error(gb, fb), 1e-5);
}

TEST(Model, TokenOutsideVocabularyIsAnError) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  auto model = Model::load(test::data_dir() / "models/stories260K");
  auto c = model->new_cache(4);
  const std::vector<int32_t> ids = {1, 512};
  const Step s{c.get(), ids, false};
  EXPECT_THROW(model->forward({&s, 1}), Error);
}

}  // namespace
}  // namespace nibble
