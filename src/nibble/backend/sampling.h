// The sampling rules, defined once for the host (the CPU executor's path and the engine's Sampler)
// and the CUDA kernels (backend/cuda/sampler.cu): the penalties, the candidate order, the filters
// (top-k, min-p, top-p), the draw from one uniform number, and log-probabilities. The request's own
// generator draws the uniform number on the host (engine/sampler.h), so both devices pick the same
// token from the same logits.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#ifdef __CUDACC__
#define NIBBLE_HOST_DEVICE __host__ __device__
#else
#define NIBBLE_HOST_DEVICE
#endif

namespace nibble {

// One row's parameters (engine/request.h's SamplingParams, as the kernels take them).
struct SamplingRule {
  float temperature = 0;  // 0: greedy
  int32_t top_k = 0;      // 0: every token
  float top_p = 1, min_p = 0;
  float repetition_penalty = 1, presence_penalty = 0, frequency_penalty = 0;
  int32_t top_logprobs = 0;  // also report this many most likely tokens
};

// A token the penalties touch: seen in the prompt or the output, generated `generated` times.
struct PenalizedToken {
  int32_t id = 0;
  int32_t generated = 0;
};

// One logits row's sampling in a step. `uniform` in [0, 1) is the request's draw (unused when
// greedy); `penalized` lists distinct ids; an inactive row (a prefill chunk that ends no prompt) is
// not sampled.
struct RowSampling {
  bool active = false;
  SamplingRule rule;
  double uniform = 0;
  std::span<const PenalizedToken> penalized;
};

// The tokens of a step's rows: ids[r] and its logprob under the model's own distribution (before
// penalties and temperature); row r's rule.top_logprobs most likely tokens at [r * top_n, ...).
struct SampledRows {
  std::vector<int32_t> ids;
  std::vector<float> logprobs;
  int32_t top_n = 0;  // the most any row asked for
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
  void resize(size_t rows, int32_t top) {
    top_n = top;
    ids.assign(rows, -1);
    logprobs.assign(rows, 0);
    top_ids.assign(rows * size_t(top), -1);
    top_logprobs.assign(rows * size_t(top), 0);
  }
};

// The candidate order: the larger logit first, the lower id on a tie (std::max_element's choice
// for greedy).
NIBBLE_HOST_DEVICE inline bool ranks_before(float a, int32_t ia, float b, int32_t ib) {
  return a > b || (a == b && ia < ib);
}

// A listed token's logit after the penalties (vLLM's order): CTRL's repetition penalty divides a
// positive logit and multiplies a negative one; a generated token then loses frequency × times
// generated + presence. One fused multiply-add, so that the host and the GPU round alike.
NIBBLE_HOST_DEVICE inline float penalized_logit(float l, int32_t generated, const SamplingRule& r) {
  if (r.repetition_penalty != 1) l = l > 0 ? l / r.repetition_penalty : l * r.repetition_penalty;
  if (generated > 0) l -= fmaf(r.frequency_penalty, float(generated), r.presence_penalty);
  return l;
}

// The draw among candidates in candidate order (sorted by ranks_before), in three steps:
//   1. candidates: the first top_k, ended by the first whose weight exp((l - best) / T) is below
//      min_p (the best's weight is 1);
//   2. top-p: the shortest prefix whose running weight reaches top_p × the candidates' weight;
//   3. the first of that prefix whose running weight passes uniform × the prefix's weight.
// Running weights are summed in chunks of kDrawChunk candidates: a chunk's weights one after the
// other, the chunks' sums one after the other. The GPU sums the chunks in parallel and gets the
// host's bits, and finds the crossing chunk by its sum before walking its 64 weights.
inline constexpr int64_t kDrawChunk = 64;

NIBBLE_HOST_DEVICE inline double draw_weight(float l, float best, float temperature) {
  return exp((double(l) - double(best)) / double(temperature));
}

// The sum of chunk c's weights w(i), i below `keep`, one after the other.
template <class Weight>
NIBBLE_HOST_DEVICE double chunk_weight(const Weight& w, int64_t c, int64_t keep) {
  const int64_t end = (c + 1) * kDrawChunk < keep ? (c + 1) * kDrawChunk : keep;
  double s = 0;
  for (int64_t i = c * kDrawChunk; i < end; ++i) s += w(i);
  return s;
}

// The first i < n whose running weight reaches `target` (at_least) or passes it, and that running
// weight in *running; n - 1 and the whole weight when none does. chunk_sum(c) is
// chunk_weight(w, c, keep) for some keep >= n.
template <class Weight, class ChunkSum>
NIBBLE_HOST_DEVICE int64_t find_running(const Weight& w, const ChunkSum& chunk_sum, int64_t n, double target,
                                        bool at_least, double* running) {
  auto passes = [&](double x) { return at_least ? x >= target : x > target; };
  const int64_t last = (n - 1) / kDrawChunk;  // the one chunk that may end before its end
  double before = 0;
  for (int64_t c = 0; c <= last; ++c) {
    if (c < last && !passes(before + chunk_sum(c))) {
      before += chunk_sum(c);
      continue;
    }
    const int64_t end = (c + 1) * kDrawChunk < n ? (c + 1) * kDrawChunk : n;
    double s = 0;
    for (int64_t i = c * kDrawChunk; i < end; ++i) {
      s += w(i);  // ends at chunk_sum(c) bit for bit: the walk finds what the sum announced
      if (passes(before + s)) {
        *running = before + s;
        return i;
      }
    }
    before += s;
  }
  *running = before;
  return n - 1;
}

// Steps 2 and 3 over `keep` candidates (step 1's count): the position drawn.
template <class Weight, class ChunkSum>
NIBBLE_HOST_DEVICE int64_t draw_among(const Weight& w, const ChunkSum& chunk_sum, int64_t keep, const SamplingRule& r,
                                      double uniform) {
  double mass = 0;
  for (int64_t c = 0; c <= (keep - 1) / kDrawChunk; ++c) mass += chunk_sum(c);
  if (r.top_p < 1) keep = find_running(w, chunk_sum, keep, double(r.top_p) * mass, true, &mass) + 1;
  double unused;
  return find_running(w, chunk_sum, keep, uniform * mass, false, &unused);
}

// log softmax of one logit, given log Σ exp(logits) of its row.
NIBBLE_HOST_DEVICE inline float logprob_of(float l, double log_z) { return float(double(l) - log_z); }

// log Σ exp(logits) of one row, in double: the logprobs' normaliser on the host.
double log_sum_exp(const float* logits, int64_t vocab);
// The n most likely of one row in candidate order and their logprobs, on the host.
void top_logprobs(const float* logits, int64_t vocab, double log_z, int64_t n, int32_t* ids, float* logprobs);

// Every active row of `logits` ([rows.size(), vocab]) sampled on the host, rows in parallel: the
// CPU executor's sampler and the reference of the CUDA one.
void sample_rows_host(std::span<const float> logits, int64_t vocab, std::span<const RowSampling> rows, SampledRows& out);

}  // namespace nibble
