// Perplexity as GPTQ and Atom measure it on WikiText-2, and KL-divergence against a base model.
//
// Protocol: the whole text is tokenized once with a single BOS at its start, cut into
// non-overlapping windows of `ctx` tokens (the remainder is dropped), each window is scored on
// its own from an empty cache, and the loss is the next-token cross-entropy at positions
// 1..ctx-1 of every window (the first token is context only). ppl = exp(mean NLL).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/backend/backend.h"
#include "nibble/model/model.h"

namespace nibble {

struct PerplexityOptions {
  int64_t ctx = 0;          // window length; 0 = min(2048, max_position_embeddings)
  int64_t max_windows = 0;  // 0 = all
  bool show_progress = true;
  // > 0: each window is fed in pieces of this many tokens, as a chunked prefill (every model the
  // same way); a cache whose stored form depends on what came later (a KIVI-style fp16 residual) is
  // then read as a decode would read it. 0: the whole window in one forward.
  int64_t prefill_chunk = 0;
};

struct PerplexityResult {
  double ppl = 0, nll_mean = 0;
  int64_t tokens = 0;       // tokens in the text (with BOS)
  int64_t scored = 0;       // predictions scored
  int64_t windows = 0, ctx = 0;
  double seconds = 0;
  std::vector<double> window_nll;  // mean NLL of each window, in text order
  // Against a base model (KLD(base || model) per predicted position), when one was given.
  bool has_base = false;
  double base_ppl = 0, kld_mean = 0, kld_median = 0, kld_p99 = 0, kld_max = 0, top1 = 0;

  nlohmann::json to_json() const;
};


// Scores `tokens` (BOS included) with `model`; with `base`, also compares its distributions.
PerplexityResult perplexity(Executor& model, std::span<const int32_t> tokens, const PerplexityOptions& opt,
                            Executor* base = nullptr);

// Scores several models on the same windows, the base (if any) run once per window for all of
// them: what an ablation table needs. Results come back in the order of `models`.
std::vector<PerplexityResult> perplexity_many(std::span<Executor* const> models, std::span<const int32_t> tokens,
                                              const PerplexityOptions& opt, Executor* base = nullptr);

// The same on the CPU reference executor of each model.
PerplexityResult perplexity(Model& model, std::span<const int32_t> tokens, const PerplexityOptions& opt,
                            Model* base = nullptr);
std::vector<PerplexityResult> perplexity_many(std::span<Model* const> models, std::span<const int32_t> tokens,
                                              const PerplexityOptions& opt, Model* base = nullptr);

// log-softmax of one row of logits, in float64.
void log_softmax(const float* logits, int64_t n, double* out);

}  // namespace nibble
