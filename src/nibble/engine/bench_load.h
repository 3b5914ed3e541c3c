// The synthetic load of a serving benchmark, one definition for `nibble bench` (the engine offline)
// and `nibble bench-serve` (a server over HTTP), so that the same seed gives both the same requests
// at the same times: prompts of random token ids whose lengths are fixed or drawn from Atom's
// distribution (its e2e/punica-atom/benchmarks/bench_textgen.py), and Poisson arrivals.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nibble {

struct LoadSpec {
  int num_prompts = 100;
  std::string dist = "fixed";                 // "fixed": prompt_len/output_len; "atom": Atom's draw
  int64_t prompt_len = 128, output_len = 128;  // dist fixed
  int64_t max_len = 2048;                      // dist atom: longest prompt + output
  int64_t vocab = 0;                           // prompt ids are drawn in [0, vocab)
  double rate = 0;                             // requests per second; 0 = all at time 0
  uint64_t seed = 0;
};

struct SyntheticRequest {
  std::vector<int32_t> prompt;
  int64_t output_len = 0;
  double arrival_s = 0;  // seconds from the start of the run
};

// The requests of `spec` in arrival order. Throws nibble::Error for a spec no request can follow.
std::vector<SyntheticRequest> synthetic_requests(const LoadSpec& spec);

// Latencies (seconds) summarised in milliseconds; all 0 for none.
struct LatencySummary {
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, mean_ms = 0;
};
LatencySummary summarize_latencies(std::vector<double> seconds);

}  // namespace nibble
