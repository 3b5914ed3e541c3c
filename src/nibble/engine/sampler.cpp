#include "nibble/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "nibble/core/error.h"

namespace nibble {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::None: return "none";
    case FinishReason::Length: return "length";
    case FinishReason::Stop: return "stop";
    case FinishReason::Abort: return "abort";
  }
  return "?";
}

void SamplingParams::validate() const {
  check(temperature >= 0, "request", "temperature must be >= 0, got {}", temperature);
  check(top_k >= 0, "request", "top_k must be >= 0, got {}", top_k);
  check(top_p > 0 && top_p <= 1, "request", "top_p must be in (0, 1], got {}", top_p);
  check(min_p >= 0 && min_p <= 1, "request", "min_p must be in [0, 1], got {}", min_p);
  check(repetition_penalty > 0, "request", "repetition_penalty must be > 0, got {}", repetition_penalty);
  check(logprobs >= 0, "request", "logprobs must be >= 0, got {}", logprobs);
}

SampledToken score_token(const float* logits, int64_t vocab, int32_t id, int top_n) {
  const float mx = *std::max_element(logits, logits + vocab);
  double z = 0;
  for (int64_t i = 0; i < vocab; ++i) z += std::exp(double(logits[i]) - mx);
  const double log_z = double(mx) + std::log(z);
  auto logprob = [&](int32_t t) { return TokenLogprob{t, float(double(logits[t]) - log_z)}; };
  SampledToken out{logprob(id), {}};
  if (top_n > 0) {
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    const int64_t n = std::min<int64_t>(top_n, vocab);
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(),
                      [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    for (int64_t i = 0; i < n; ++i) out.top.push_back(logprob(ids[size_t(i)]));
  }
  return out;
}

Sampler::Sampler(const SamplingParams& params, std::span<const int32_t> prompt)
    : p_(params), rng_(params.seed), prompt_(prompt.begin(), prompt.end()) {
  p_.validate();
}

SampledToken Sampler::sample(const float* logits, int64_t vocab) {
  // Penalties (vLLM's order): repetition over prompt and output, presence and frequency over the output.
  std::vector<float> l(logits, logits + vocab);
  if (seen_.empty()) {
    seen_.assign(size_t(vocab), false);
    for (int32_t t : prompt_) seen_[size_t(t)] = true;
  }
  if (p_.repetition_penalty != 1)
    for (int64_t i = 0; i < vocab; ++i)
      if (seen_[size_t(i)]) l[size_t(i)] = l[size_t(i)] > 0 ? l[size_t(i)] / p_.repetition_penalty : l[size_t(i)] * p_.repetition_penalty;
  for (const auto& [id, count] : generated_)
    l[size_t(id)] -= p_.frequency_penalty * float(count) + p_.presence_penalty;

  int32_t pick;
  if (p_.temperature == 0) {
    pick = int32_t(std::max_element(l.begin(), l.end()) - l.begin());
  } else {
    // Candidates by logit: the top k, those at least min_p as likely as the best, then the
    // smallest prefix holding top_p of the remaining mass.
    std::vector<int32_t> ids(static_cast<size_t>(vocab));
    std::iota(ids.begin(), ids.end(), 0);
    const int64_t k = p_.top_k > 0 ? std::min<int64_t>(p_.top_k, vocab) : vocab;
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
      return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
    });
    ids.resize(size_t(k));
    std::vector<double> w(ids.size());
    const double best = l[size_t(ids[0])];
    double sum = 0;
    size_t keep = 0;
    for (; keep < ids.size(); ++keep) {
      w[keep] = std::exp((double(l[size_t(ids[keep])]) - best) / p_.temperature);
      if (w[keep] < p_.min_p) break;  // w of the best is 1
      sum += w[keep];
    }
    double cum = 0;
    for (size_t i = 0; i < keep; ++i)
      if ((cum += w[i]) >= p_.top_p * sum) {
        keep = i + 1;
        sum = cum;
        break;
      }
    const double u = std::generate_canonical<double, 53>(rng_) * sum;
    cum = 0;
    pick = ids[keep - 1];
    for (size_t i = 0; i < keep; ++i)
      if ((cum += w[i]) > u) {
        pick = ids[i];
        break;
      }
  }

  SampledToken out = score_token(logits, vocab, pick, p_.logprobs);
  ++generated_[pick];
  seen_[size_t(pick)] = true;
  return out;
}

bool Sampler::plain_greedy() const {
  return p_.temperature == 0 && p_.repetition_penalty == 1 && p_.presence_penalty == 0 &&
         p_.frequency_penalty == 0 && p_.logprobs == 0;
}

SampledToken Sampler::take(int32_t id) {
  ++generated_[id];
  if (!seen_.empty()) seen_[size_t(id)] = true;
  return {TokenLogprob{id, std::numeric_limits<float>::quiet_NaN()}, {}};
}

std::vector<SampledToken> sample_batch(std::span<const float> logits, int64_t vocab, std::span<Sampler* const> samplers) {
  check(int64_t(logits.size()) == int64_t(samplers.size()) * vocab, "sampler", "{} logits for {} rows of {}",
        logits.size(), samplers.size(), vocab);
  std::vector<SampledToken> out(samplers.size());
#pragma omp parallel for if (samplers.size() > 4)
  for (size_t i = 0; i < samplers.size(); ++i) out[i] = samplers[i]->sample(logits.data() + int64_t(i) * vocab, vocab);
  return out;
}

}  // namespace nibble
