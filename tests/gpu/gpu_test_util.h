// Helpers shared by the GPU tests: a GPU check that skips (no GPU) or fails (GPU asked for, or broken), a counter-based RNG (so
// big random inputs are made in parallel and reproducibly), and a parallel loop.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace nibble::testing {

// Whether the GPU tests can run. A machine with no GPU (no device, or no driver at all) skips them,
// unless NIBBLE_REQUIRE_GPU=1 asks for the GPU (scripts/device.sh sets it): then that fails too.
// Any other CUDA error (a broken driver, a device in a bad state) fails: it must not read as "no GPU".
enum class GpuState { Ready, Absent, Broken };

inline GpuState gpu_state(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  cudaGetLastError();
  if (e == cudaSuccess && n > 0) return GpuState::Ready;
  *why = e == cudaSuccess ? std::string("no CUDA device") : std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
  const bool absent = e == cudaSuccess || e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver;
  const char* require = std::getenv("NIBBLE_REQUIRE_GPU");
  return absent && !(require && std::string(require) == "1") ? GpuState::Absent : GpuState::Broken;
}

#define NIBBLE_REQUIRE_GPU()                                                                              \
  do {                                                                                                    \
    std::string why_;                                                                                     \
    switch (::nibble::testing::gpu_state(&why_)) {                                                        \
      case ::nibble::testing::GpuState::Ready: break;                                                     \
      case ::nibble::testing::GpuState::Absent: GTEST_SKIP() << "skipped: " << why_;                      \
      case ::nibble::testing::GpuState::Broken: GTEST_FAIL() << why_ << " (NIBBLE_REQUIRE_GPU=1 or a CUDA error)"; \
    }                                                                                                     \
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

// The seed of this run: NIBBLE_TEST_SEED to replay one (with the same --gtest_filter), else a fresh
// one from std::random_device; printed once. fresh_seed() derives the run's successive seeds from it.
inline uint64_t run_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("NIBBLE_TEST_SEED");
    const uint64_t s = env && *env ? std::strtoull(env, nullptr, 10) : (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
    std::printf("GPU tests: run seed %llu (NIBBLE_TEST_SEED=%llu replays this run)\n", (unsigned long long)s,
                (unsigned long long)s);
    return s;
  }();
  return seed;
}
inline uint64_t fresh_seed() {
  static std::atomic<uint64_t> n{0};
  return splitmix64(run_seed() ^ splitmix64(n++));
}

// [rows, cols] activations/weights: uniform noise whose range varies by row and by 128-wide group
// (factors 1/4..4, so a kernel applying another row's or group's scale is off by far more than
// rounding), with a few large channels (Atom's outliers, which the reorder puts at the end: the
// keeper channels get 8x the range).
inline std::vector<float> random_matrix(uint64_t seed, int64_t rows, int64_t cols, float range, int keeper) {
  std::vector<float> x(size_t(rows * cols));
  parallel_for(rows, [&](int64_t r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t group = c >= cols - keeper ? cols : c / 128;  // the keepers share one per-row range
      const float factor = std::ldexp(1.0f, int(splitmix64(seed ^ splitmix64(uint64_t(r * (cols + 1) + group))) % 5) - 2);
      float v = range * factor * uniform(seed, uint64_t(r * cols + c));
      if (c >= cols - keeper) v *= 8;
      x[size_t(r * cols + c)] = v;
    }
  });
  return x;
}

}  // namespace nibble::testing
