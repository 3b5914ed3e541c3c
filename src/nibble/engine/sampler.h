// One request's sampling state across steps: its parameters, its generator and the tokens its
// penalties touch. The choice itself is the executor's (Executor::forward_sample, by the rules of
// backend/sampling.h, on the device that holds the logits); the generator stays here, one per
// request, so its tokens depend on its seed alone, never on what else shares the batch or on the
// device.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <unordered_map>
#include <vector>

#include "nibble/backend/sampling.h"
#include "nibble/engine/request.h"

namespace nibble {

// `id`'s log-probability under one row of logits (the model's distribution) and the top_n most likely.
SampledToken score_token(const float* logits, int64_t vocab, int32_t id, int top_n);

class Sampler {
 public:
  Sampler(const SamplingParams& params, std::span<const int32_t> prompt);
  // This step's row: the rule, a fresh uniform draw when sampling (none when greedy), the
  // penalized tokens (valid until record).
  RowSampling next_row();
  // Records row `r` of a step's result as this request's next token.
  SampledToken record(const SampledRows& rows, size_t r);
  // Greedy with no penalty and no logprobs: the argmax is the whole choice, so the engine may take
  // the executor's greedy ids instead (forward_greedy).
  bool plain_greedy() const;
  // Records `id` (the executor's greedy pick) as generated.
  SampledToken take(int32_t id);
  // next_row, sampled from one row of `vocab` logits on the host, recorded.
  SampledToken sample(const float* logits, int64_t vocab);

 private:
  void count(int32_t id);

  SamplingParams p_;
  std::mt19937_64 rng_;
  bool penalties_;
  std::vector<PenalizedToken> penalized_;         // distinct: the prompt's (repetition) and the output's
  std::unordered_map<int32_t, size_t> position_;  // id -> its place in penalized_
};

}  // namespace nibble
