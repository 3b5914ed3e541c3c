#include "nibble/engine/bench_load.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "nibble/core/error.h"

namespace nibble {

namespace {
struct Lengths {
  int64_t prompt, output;
};

// Atom's draw: prompt = lognormal(shape 0.8, loc -1, scale 18) clamped to [1, maxlen - 2];
// total = max(prompt + 2, uniform integer in [0, maxlen)); output = total - prompt.
Lengths atom_lengths(std::mt19937_64& rng, int64_t maxlen) {
  std::normal_distribution<double> z;
  const double p = -1 + 18 * std::exp(0.8 * z(rng));
  const int64_t prompt = std::clamp<int64_t>(int64_t(p), 1, maxlen - 2);
  const int64_t total = std::max(prompt + 2, std::uniform_int_distribution<int64_t>(0, maxlen - 1)(rng));
  return {prompt, total - prompt};
}
}  // namespace

std::vector<SyntheticRequest> synthetic_requests(const LoadSpec& spec) {
  check(spec.dist == "fixed" || spec.dist == "atom", "load", "unknown length distribution '{}' (fixed or atom)",
        spec.dist);
  check(spec.vocab > 0, "load", "a vocabulary of {} tokens", spec.vocab);
  check(spec.rate >= 0, "load", "a negative arrival rate {}", spec.rate);
  check(spec.dist != "atom" || spec.max_len >= 3, "load", "--max-len {} leaves no room for a prompt and an output",
        spec.max_len);
  std::mt19937_64 rng(spec.seed);
  std::exponential_distribution<double> gap(spec.rate > 0 ? spec.rate : 1);
  std::vector<SyntheticRequest> reqs(size_t(std::max(spec.num_prompts, 0)));
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Lengths len = spec.dist == "atom" ? atom_lengths(rng, spec.max_len) : Lengths{spec.prompt_len, spec.output_len};
    reqs[i].prompt.resize(size_t(len.prompt));
    for (int32_t& t : reqs[i].prompt) t = int32_t(rng() % uint64_t(spec.vocab));
    reqs[i].output_len = len.output;
    if (spec.rate > 0) reqs[i].arrival_s = (i ? reqs[i - 1].arrival_s : 0) + gap(rng);
  }
  return reqs;
}

LatencySummary summarize_latencies(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  auto at = [&](double q) { return 1000 * v[size_t(std::llround(q * double(v.size() - 1)))]; };
  return {at(0.5), at(0.9), at(0.99), 1000 * std::accumulate(v.begin(), v.end(), 0.0) / double(v.size())};
}

}  // namespace nibble
