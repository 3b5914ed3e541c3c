// Next-token sampling: greedy by default; temperature, top-k and top-p (nucleus) with a seed.
#pragma once

#include <cstdint>
#include <random>

namespace nibble {

struct SamplerOptions {
  float temperature = 0.0f;  // 0 = greedy (argmax)
  int top_k = 0;             // 0 = all tokens
  float top_p = 1.0f;        // 1 = no nucleus cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplerOptions opt);
  // Picks a token from one row of `n` logits.
  int32_t sample(const float* logits, int64_t n);

 private:
  SamplerOptions opt_;
  std::mt19937_64 rng_;
};

}  // namespace nibble
