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
  const double log_z = log_sum_exp(logits, vocab);
  SampledToken out{{id, logprob_of(logits[id], log_z)}, {}};
  const int64_t n = std::min<int64_t>(top_n, vocab);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::vector<float> logprobs(static_cast<size_t>(n));
  top_logprobs(logits, vocab, log_z, n, ids.data(), logprobs.data());
  for (int64_t i = 0; i < n; ++i) out.top.push_back({ids[size_t(i)], logprobs[size_t(i)]});
  return out;
}

Sampler::Sampler(const SamplingParams& params, std::span<const int32_t> prompt)
    : p_(params),
      rng_(params.seed),
      penalties_(params.repetition_penalty != 1 || params.presence_penalty != 0 || params.frequency_penalty != 0) {
  p_.validate();
  // The prompt counts for the repetition penalty only (presence and frequency: generated tokens).
  if (p_.repetition_penalty != 1)
    for (int32_t t : prompt)
      if (position_.emplace(t, penalized_.size()).second) penalized_.push_back({t, 0});
}

RowSampling Sampler::next_row() {
  RowSampling row;
  row.active = true;
  row.rule = {.temperature = p_.temperature,
              .top_k = p_.top_k,
              .top_p = p_.top_p,
              .min_p = p_.min_p,
              .repetition_penalty = p_.repetition_penalty,
              .presence_penalty = p_.presence_penalty,
              .frequency_penalty = p_.frequency_penalty,
              .top_logprobs = p_.logprobs};
  if (p_.temperature > 0) row.uniform = std::generate_canonical<double, 53>(rng_);
  row.penalized = penalized_;
  return row;
}

void Sampler::count(int32_t id) {
  if (!penalties_) return;
  const auto [it, added] = position_.emplace(id, penalized_.size());
  if (added) penalized_.push_back({id, 0});
  ++penalized_[it->second].generated;
}

SampledToken Sampler::record(const SampledRows& rows, size_t r) {
  SampledToken out{{rows.ids[r], rows.logprobs[r]}, {}};
  for (int32_t i = 0; i < std::min(p_.logprobs, rows.top_n); ++i)
    out.top.push_back({rows.top_ids[r * size_t(rows.top_n) + size_t(i)], rows.top_logprobs[r * size_t(rows.top_n) + size_t(i)]});
  count(out.token.id);
  return out;
}

bool Sampler::plain_greedy() const { return p_.temperature == 0 && !penalties_ && p_.logprobs == 0; }

SampledToken Sampler::take(int32_t id) {
  count(id);
  return {TokenLogprob{id, std::numeric_limits<float>::quiet_NaN()}, {}};
}

SampledToken Sampler::sample(const float* logits, int64_t vocab) {
  const RowSampling row = next_row();
  SampledRows out;
  sample_rows_host({logits, size_t(vocab)}, vocab, {&row, 1}, out);
  return record(out, 0);
}

}  // namespace nibble
