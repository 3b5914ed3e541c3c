#include "nibble/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "nibble/core/error.h"

namespace nibble {

Sampler::Sampler(SamplerOptions opt) : opt_(opt), rng_(opt.seed) {
  check(opt.temperature >= 0, "sampler", "temperature must be >= 0, got {}", opt.temperature);
  check(opt.top_k >= 0, "sampler", "top-k must be >= 0, got {}", opt.top_k);
  check(opt.top_p > 0 && opt.top_p <= 1, "sampler", "top-p must be in (0, 1], got {}", opt.top_p);
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (opt_.temperature == 0) return int32_t(std::max_element(logits, logits + n) - logits);
  // Candidates sorted by logit; keep the top k, then the smallest prefix holding top_p of the mass.
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  const int64_t k = opt_.top_k > 0 ? std::min<int64_t>(opt_.top_k, n) : n;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  ids.resize(size_t(k));
  std::vector<double> p(ids.size());
  const double mx = logits[ids[0]];
  double sum = 0;
  for (size_t i = 0; i < ids.size(); ++i) sum += (p[i] = std::exp((double(logits[ids[i]]) - mx) / opt_.temperature));
  size_t keep = ids.size();
  double cum = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    cum += p[i] / sum;
    if (cum >= opt_.top_p) {
      keep = i + 1;
      break;
    }
  }
  std::discrete_distribution<size_t> pick(p.begin(), p.begin() + ptrdiff_t(keep));
  return ids[pick(rng_)];
}

}  // namespace nibble
