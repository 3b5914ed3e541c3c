// Shared test helpers: where the reference data lives, and what happens when it is absent.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"

namespace nibble::test {

// The source checkout (its tests/fixtures); NIBBLE_SOURCE_DIR in the environment moves it (test
// programs packed and run on another machine, beside a copy of the checkout).
inline std::filesystem::path source_dir() {
  if (const char* env = std::getenv("NIBBLE_SOURCE_DIR"); env && *env) return env;
  return NIBBLE_SOURCE_DIR;
}

// NIBBLE_DATA, or ../shared/data beside the source checkout.
inline std::filesystem::path data_dir() {
  if (const char* env = std::getenv("NIBBLE_DATA"); env && *env) return env;
  return source_dir() / ".." / "shared" / "data";
}

// Whoever sets NIBBLE_DATA asks for the reference-data tests: a missing file is then a failure,
// not a skip (a wrong path must not turn a run green).
inline bool data_requested() {
  const char* env = std::getenv("NIBBLE_DATA");
  return env && *env;
}
// An int32 tensor of a reference file (a fixture's input_ids, greedy_ids).
inline std::vector<int32_t> load_ids(const Checkpoint& ref, const std::string& name) {
  const TensorInfo& t = ref.get(name);
  const auto* p = reinterpret_cast<const int32_t*>(t.data);
  return std::vector<int32_t>(p, p + t.numel());
}

inline std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % uint32_t(vocab));
  return t;
}

// Every position's logits of `ids` run as one sequence through a fresh cache of the model's format.
inline std::vector<float> logits_of(Model& m, const std::vector<int32_t>& ids) {
  auto cache = m.new_cache(int64_t(ids.size()));
  const Step s{cache.get(), ids, true};
  return m.forward({&s, 1});
}

// max |R·Rᵀ − I| of a square n × n R (row-major; the same as RᵀR = I), in float64 loops.
inline double orthogonality_error(const std::vector<double>& r, int64_t n) {
  double worst = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double dot = 0;
      for (int64_t k = 0; k < n; ++k) dot += r[size_t(i * n + k)] * r[size_t(j * n + k)];
      worst = std::max(worst, std::abs(dot - (i == j ? 1.0 : 0.0)));
    }
  return worst;
}

// max |a - b| / max |b|.
inline double rel_max(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, r = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::abs(double(a[i]) - b[i]));
    r = std::max(r, std::abs(double(b[i])));
  }
  return d / r;
}
}  // namespace nibble::test

// A file or folder of the reference data that is missing fails the current test when NIBBLE_DATA
// was set, and skips it with a message otherwise.
#define NIBBLE_REQUIRE_DATA(relpath)                                                                      \
  do {                                                                                                    \
    const std::filesystem::path nibble_path_ = ::nibble::test::data_dir() / (relpath);                   \
    if (!std::filesystem::exists(nibble_path_)) {                                                         \
      if (::nibble::test::data_requested())                                                               \
        GTEST_FAIL() << "reference data not found: " << nibble_path_ << " (NIBBLE_DATA is set: fix it)"; \
      GTEST_SKIP() << "reference data not found: " << nibble_path_                                        \
                   << " (set NIBBLE_DATA to the shared/data folder)";                                     \
    }                                                                                                     \
  } while (0)
