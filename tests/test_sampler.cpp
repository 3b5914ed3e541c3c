// The sampler against independent references: float64 log-softmax for the logprobs, the
// filtered and renormalised distributions for top-k / top-p / min-p (frequencies of many draws),
// the penalty formulas on hand-made logits, and one generator per request.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>

#include "nibble/core/error.h"
#include "nibble/engine/sampler.h"

namespace nibble {
namespace {

std::vector<int32_t> draw(const SamplingParams& p, const std::vector<float>& logits, int n,
                          std::span<const int32_t> prompt = {}) {
  Sampler s(p, prompt);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(s.sample(logits.data(), int64_t(logits.size())).token.id);
  return out;
}

// Frequencies of `n` draws of fresh samplers (no penalties: each draw sees the same logits).
std::map<int32_t, double> frequencies(SamplingParams p, const std::vector<float>& logits, int n) {
  std::map<int32_t, double> f;
  for (int32_t t : draw(p, logits, n)) f[t] += 1.0 / n;
  return f;
}

// Logits whose softmax is `probs`.
std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double q : probs) l.push_back(float(std::log(q)));
  return l;
}

TEST(Sampler, LogprobsAreTheModelsLogSoftmaxAndTopNIsOrdered) {
  const std::vector<float> logits = {0.5f, 3.0f, -1.0f, 2.0f, 2.9f};
  double z = 0;
  for (float l : logits) z += std::exp(double(l));
  SamplingParams p;
  p.logprobs = 3;
  p.repetition_penalty = 2;  // penalties change the choice, not the reported logprobs
  Sampler s(p, std::vector<int32_t>{1});
  const SampledToken t = s.sample(logits.data(), 5);
  EXPECT_EQ(t.token.id, 4);  // 3.0 / 2 < 2.9
  EXPECT_NEAR(t.token.logprob, 2.9 - std::log(z), 1e-6);
  ASSERT_EQ(t.top.size(), 3u);
  const int32_t order[] = {1, 4, 3};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(t.top[size_t(i)].id, order[i]);
    EXPECT_NEAR(t.top[size_t(i)].logprob, logits[size_t(order[i])] - std::log(z), 1e-6);
  }
}

TEST(Sampler, PenaltiesFollowTheirFormulas) {
  using V = std::vector<int32_t>;
  // Repetition, over prompt and output: a positive logit is divided, a negative one multiplied.
  SamplingParams rep;
  rep.repetition_penalty = 1.5f;
  EXPECT_EQ(draw({}, {2.0f, 1.5f}, 1, V{0}), V{0});
  EXPECT_EQ(draw(rep, {2.0f, 1.5f}, 1, V{0}), V{1});     // 2.0 / 1.5 < 1.5
  EXPECT_EQ(draw(rep, {-1.0f, -1.2f}, 1, V{0}), V{1});   // -1.0 * 1.5 < -1.2
  EXPECT_EQ(draw(rep, {2.0f, 1.5f}, 3), (V{0, 1, 0}));   // generated tokens count too
  // Presence: once per generated token; frequency: per time generated.
  SamplingParams presence;
  presence.presence_penalty = 0.5f;
  EXPECT_EQ(draw(presence, {1.0f, 0.6f}, 3), (V{0, 1, 0}));  // 0.5 < 0.6, then 0.5 > 0.1
  SamplingParams frequency;
  frequency.frequency_penalty = 0.3f;
  EXPECT_EQ(draw(frequency, {1.0f, 0.5f}, 4), (V{0, 0, 1, 0}));  // 1.0, 0.7, 0.4 < 0.5, 0.4 > 0.2
  // The prompt does not count for presence and frequency.
  EXPECT_EQ(draw(presence, {1.0f, 0.6f}, 1, V{0}), V{0});
}

TEST(Sampler, FiltersKeepTheRightTokensWithRenormalisedOdds) {
  const uint64_t seed = 21;
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const std::vector<float> logits = logits_of({0.4, 0.3, 0.2, 0.1});
  const int n = 20000;
  auto expect_freqs = [&](const SamplingParams& p, const std::vector<double>& want) {
    const auto f = frequencies(p, logits, n);
    for (size_t i = 0; i < want.size(); ++i) {
      const double got = f.count(int32_t(i)) ? f.at(int32_t(i)) : 0.0;
      if (want[i] == 0) EXPECT_EQ(got, 0.0) << "token " << i;
      else EXPECT_NEAR(got, want[i], 0.02) << "token " << i;
    }
  };
  SamplingParams p;
  p.temperature = 1;
  p.seed = seed;
  expect_freqs(p, {0.4, 0.3, 0.2, 0.1});
  SamplingParams k = p;
  k.top_k = 2;
  expect_freqs(k, {0.4 / 0.7, 0.3 / 0.7, 0, 0});
  SamplingParams top_p = p;
  top_p.top_p = 0.75f;  // 0.4 + 0.3 < 0.75 <= 0.9
  expect_freqs(top_p, {0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0});
  SamplingParams min_p = p;
  min_p.min_p = 0.6f;  // keeps p >= 0.24
  expect_freqs(min_p, {0.4 / 0.7, 0.3 / 0.7, 0, 0});
  SamplingParams cold = p;
  cold.temperature = 0.5f;  // p^2, renormalised
  expect_freqs(cold, {0.16 / 0.30, 0.09 / 0.30, 0.04 / 0.30, 0.01 / 0.30});
}

// Running weights are summed in chunks of kDrawChunk candidates (backend/sampling.h): over 300 equal
// logits in 5 chunks, top_p 0.5 keeps exactly the first 150 in candidate order (ids 0..149: the lower
// id first on a tie) and draws them uniformly, whichever chunk the draw lands in.
TEST(Sampler, TopPAndTheDrawAcrossChunks) {
  const uint64_t seed = 5;
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  const std::vector<float> logits(300, 0.25f);
  SamplingParams p;
  p.temperature = 1;
  p.top_p = 0.5f;
  p.seed = seed;
  const int n = 30000;
  std::vector<int> count(300);
  Sampler s(p, {});
  for (int i = 0; i < n; ++i) ++count[size_t(s.sample(logits.data(), 300).token.id)];
  for (int id = 0; id < 300; ++id) {
    if (id >= 150) EXPECT_EQ(count[size_t(id)], 0) << "token " << id;
    else EXPECT_NEAR(count[size_t(id)], n / 150.0, 60) << "token " << id;  // 200 ± 4.3σ
  }
}

TEST(Sampler, EachRequestHasItsOwnGenerator) {
  const std::vector<float> logits = logits_of({0.25, 0.25, 0.25, 0.25});
  SamplingParams a, b;
  a.temperature = b.temperature = 1;
  a.seed = 1;
  b.seed = 2;
  const auto alone_a = draw(a, logits, 50), alone_b = draw(b, logits, 50);
  EXPECT_EQ(draw(a, logits, 50), alone_a);
  EXPECT_NE(alone_a, alone_b);
  // In a batch, each row through its own sampler: the same tokens as alone.
  Sampler sa(a, {}), sb(b, {}), sg({}, {});
  std::vector<float> rows;
  for (int r = 0; r < 3; ++r) rows.insert(rows.end(), logits.begin(), logits.end());
  Sampler* const samplers[] = {&sb, &sg, &sa};
  for (int i = 0; i < 50; ++i) {
    std::vector<RowSampling> step;
    for (Sampler* s : samplers) step.push_back(s->next_row());
    SampledRows out;
    sample_rows_host(rows, 4, step, out);
    EXPECT_EQ(samplers[0]->record(out, 0).token.id, alone_b[size_t(i)]);
    EXPECT_EQ(samplers[1]->record(out, 1).token.id, 0);  // greedy: the first of equal logits
    EXPECT_EQ(samplers[2]->record(out, 2).token.id, alone_a[size_t(i)]);
  }
}

TEST(Sampler, BadParametersAreRefusedByName) {
  for (auto [set, field] : std::vector<std::pair<std::function<void(SamplingParams&)>, std::string>>{
           {[](SamplingParams& p) { p.temperature = -1; }, "temperature"},
           {[](SamplingParams& p) { p.top_k = -1; }, "top_k"},
           {[](SamplingParams& p) { p.top_p = 0; }, "top_p"},
           {[](SamplingParams& p) { p.min_p = 2; }, "min_p"},
           {[](SamplingParams& p) { p.repetition_penalty = 0; }, "repetition_penalty"},
           {[](SamplingParams& p) { p.logprobs = -1; }, "logprobs"}}) {
    SamplingParams p;
    set(p);
    try {
      p.validate();
      ADD_FAILURE() << field << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace nibble
