// Two sequences of random tokens through an executor: a ragged prefill (every token's logits), then
// decode steps of both in one batch (on the GPU the first runs eagerly, the second is captured as a
// graph, the rest replay it). Returns every logits row in order: what the tensor-parallel tests
// compare between a group of ranks and one executor.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "nibble/backend/backend.h"

namespace nibble::test {

inline std::vector<float> prefill_and_decode(Executor& ex, uint64_t seed, size_t len_a, size_t len_b, int decode_steps) {
  std::mt19937 rng{uint32_t(seed)};
  auto tokens = [&](size_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = int32_t(rng() % uint32_t(ex.config().vocab_size));
    return t;
  };
  const SeqId a = ex.kv().add(), b = ex.kv().add();
  const std::vector<int32_t> pa = tokens(len_a), pb = tokens(len_b);
  std::vector<float> all, logits;
  const BatchEntry prefill[] = {{a, pa, true}, {b, pb, true}};
  ex.forward(prefill, logits);
  all.insert(all.end(), logits.begin(), logits.end());
  for (int step = 0; step < decode_steps; ++step) {
    const std::vector<int32_t> ta = tokens(1), tb = tokens(1);
    const BatchEntry decode[] = {{a, ta, false}, {b, tb, false}};
    ex.forward(decode, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

}  // namespace nibble::test
