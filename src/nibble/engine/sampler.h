// Next-token sampling for a batch of requests: penalties, temperature, top-k, top-p, min-p and the
// top-n logprobs. Each request owns its generator, so its tokens depend on its seed alone, never
// on what else shares the batch.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <unordered_map>
#include <vector>

#include "nibble/engine/request.h"

namespace nibble {

// `id`'s log-probability under one row of logits (the model's distribution) and the top_n most likely.
SampledToken score_token(const float* logits, int64_t vocab, int32_t id, int top_n);

// One request's sampler: its parameters, its generator, and the tokens it has seen (penalties).
class Sampler {
 public:
  Sampler(const SamplingParams& params, std::span<const int32_t> prompt);
  // Picks the next token from one row of `vocab` logits and records it as generated.
  SampledToken sample(const float* logits, int64_t vocab);
  // Greedy with no penalty and no logprobs: the argmax is the whole choice, so the engine may take
  // the executor's greedy ids instead of the logits (forward_greedy).
  bool plain_greedy() const;
  // Records `id` (the executor's greedy pick) as generated, as sample would.
  SampledToken take(int32_t id);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<int32_t> prompt_;
  std::unordered_map<int32_t, int> generated_;  // token -> times generated
  std::vector<bool> seen_;                      // prompt or generated, sized to the vocabulary on first use
};

// Row i of `logits` ([samplers.size(), vocab]) through samplers[i], the rows in parallel.
std::vector<SampledToken> sample_batch(std::span<const float> logits, int64_t vocab, std::span<Sampler* const> samplers);

}  // namespace nibble
