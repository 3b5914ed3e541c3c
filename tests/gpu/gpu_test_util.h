// Helpers shared by the GPU tests: a GPU check that skips with a message, a counter-based RNG (so
// big random inputs are made in parallel and reproducibly), and a parallel loop.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace nibble::testing {

inline bool have_gpu(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    *why = e != cudaSuccess ? std::string("no usable CUDA device: ") + cudaGetErrorString(e) : "no CUDA device";
    cudaGetLastError();
    return false;
  }
  return true;
}

#define NIBBLE_REQUIRE_GPU()                                            \
  do {                                                                  \
    std::string why_;                                                   \
    if (!::nibble::testing::have_gpu(&why_)) GTEST_SKIP() << "skipped: " << why_; \
  } while (0)

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// Uniform in [-1, 1), a pure function of (seed, index).
inline float uniform(uint64_t seed, uint64_t i) {
  return float(int64_t(splitmix64(seed * 0x100000001b3ull ^ i) >> 40) - (int64_t(1) << 23)) * 0x1p-23f;
}

template <typename F>
void parallel_for(int64_t n, F&& f) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(std::thread::hardware_concurrency(), n / 1024 + 1));
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int64_t i = n * t / threads; i < n * (t + 1) / threads; ++i) f(i);
    });
  for (auto& th : pool) th.join();
}

// [rows, cols] activations/weights: uniform noise with a few large channels (Atom's outliers,
// which the reorder puts at the end: the keeper channels get 8x the range).
inline std::vector<float> random_matrix(uint64_t seed, int64_t rows, int64_t cols, float range, int keeper) {
  std::vector<float> x(size_t(rows * cols));
  parallel_for(rows, [&](int64_t r) {
    for (int64_t c = 0; c < cols; ++c) {
      float v = range * uniform(seed, uint64_t(r * cols + c));
      if (c >= cols - keeper) v *= 8;
      x[size_t(r * cols + c)] = v;
    }
  });
  return x;
}

}  // namespace nibble::testing
