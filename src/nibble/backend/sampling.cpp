#include "nibble/backend/sampling.h"

#include <algorithm>
#include <numeric>

#include "nibble/core/error.h"

namespace nibble {

namespace {
auto by_rank(const float* v) {
  return [v](int32_t a, int32_t b) { return ranks_before(v[a], a, v[b], b); };
}

// Row r of the step: the penalties on a copy, the draw (or the argmax), the model's logprobs.
void sample_row(const float* logits, int64_t vocab, const RowSampling& row, SampledRows& out, size_t r) {
  const SamplingRule& rule = row.rule;
  std::vector<float> l(logits, logits + vocab);
  for (const PenalizedToken& p : row.penalized) l[size_t(p.id)] = penalized_logit(logits[p.id], p.generated, rule);
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  int32_t pick;
  if (rule.temperature == 0) {
    pick = *std::min_element(ids.begin(), ids.end(), by_rank(l.data()));
  } else {
    const int64_t k = rule.top_k > 0 ? std::min<int64_t>(rule.top_k, vocab) : vocab;
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), by_rank(l.data()));
    const float best = l[size_t(ids[0])];
    auto w = [&](int64_t i) { return draw_weight(l[size_t(ids[size_t(i)])], best, rule.temperature); };
    int64_t keep = k;
    if (rule.min_p > 0)
      for (int64_t i = 0; i < k; ++i)
        if (w(i) < rule.min_p) {
          keep = i;
          break;
        }
    std::vector<double> chunks(size_t((keep + kDrawChunk - 1) / kDrawChunk));
    for (size_t c = 0; c < chunks.size(); ++c) chunks[c] = chunk_weight(w, int64_t(c), keep);
    pick = ids[size_t(draw_among(w, [&](int64_t c) { return chunks[size_t(c)]; }, keep, rule, row.uniform))];
  }
  const double log_z = log_sum_exp(logits, vocab);
  out.ids[r] = pick;
  out.logprobs[r] = logprob_of(logits[pick], log_z);
  const size_t at = r * size_t(out.top_n);
  top_logprobs(logits, vocab, log_z, std::min<int64_t>(rule.top_logprobs, vocab), out.top_ids.data() + at,
               out.top_logprobs.data() + at);
}
}  // namespace

double log_sum_exp(const float* logits, int64_t vocab) {
  const float mx = *std::max_element(logits, logits + vocab);
  double z = 0;
  for (int64_t i = 0; i < vocab; ++i) z += std::exp(double(logits[i]) - mx);
  return double(mx) + std::log(z);
}

void top_logprobs(const float* logits, int64_t vocab, double log_z, int64_t n, int32_t* ids, float* logprobs) {
  if (n <= 0) return;
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + n, order.end(), by_rank(logits));
  for (int64_t i = 0; i < n; ++i) {
    ids[i] = order[size_t(i)];
    logprobs[i] = logprob_of(logits[order[size_t(i)]], log_z);
  }
}

void sample_rows_host(std::span<const float> logits, int64_t vocab, std::span<const RowSampling> rows, SampledRows& out) {
  check(int64_t(logits.size()) == int64_t(rows.size()) * vocab, "sampler", "{} logits for {} rows of {}", logits.size(),
        rows.size(), vocab);
  int32_t top = 0;
  for (const RowSampling& row : rows) top = std::max(top, row.active ? row.rule.top_logprobs : 0);
  out.resize(rows.size(), top);
#pragma omp parallel for if (rows.size() > 4)
  for (size_t r = 0; r < rows.size(); ++r)
    if (rows[r].active) sample_row(logits.data() + int64_t(r) * vocab, vocab, rows[r], out, r);
}

}  // namespace nibble
