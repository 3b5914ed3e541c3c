// The GPU sampler (backend/cuda/sampler) against the host's (sample_rows_host, the CPU executor's
// path): engine Samplers with every kind of rule give each step's rows (their own generators' draws,
// their penalized tokens), both devices sample the same logits, and the ids must be the same, the
// logprobs and top-n logprobs the same to float rounding. Steps of 80 rows (two sort batches), some
// inactive, and a 128k vocabulary.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <random>

#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/cuda/sampler.h"
#include "nibble/engine/sampler.h"
#include "gpu_test_util.h"

namespace nibble {
namespace {

// Rules that cover every filter and penalty, alone and together.
std::vector<SamplingParams> rules() {
  std::vector<SamplingParams> r(9);
  r[1].repetition_penalty = 1.3f, r[1].presence_penalty = 0.4f, r[1].frequency_penalty = 0.2f, r[1].logprobs = 5;
  r[2].temperature = 1;
  r[3].temperature = 0.7f, r[3].top_k = 40;
  r[4].temperature = 1.2f, r[4].top_p = 0.9f;
  r[5].temperature = 0.8f, r[5].min_p = 0.05f;
  r[6].temperature = 1, r[6].top_k = 100, r[6].top_p = 0.8f, r[6].min_p = 0.02f, r[6].repetition_penalty = 1.2f,
  r[6].presence_penalty = 0.3f, r[6].frequency_penalty = 0.1f, r[6].logprobs = 3;
  r[7].temperature = 1, r[7].top_p = 0.5f, r[7].repetition_penalty = 1.5f, r[7].logprobs = 20;
  r[8].temperature = 2, r[8].top_k = 1;  // one candidate: greedy by another road
  return r;
}

void compare_case(int64_t rows, int64_t V, int steps) {
  const uint64_t seed = testing::fresh_seed();
  std::printf("seed %llu: %lld rows of %lld logits, %d steps\n", (unsigned long long)seed, (long long)rows,
              (long long)V, steps);
  std::mt19937_64 rng(seed);
  const std::vector<SamplingParams> kinds = rules();
  std::vector<Sampler> samplers;
  for (int64_t r = 0; r < rows; ++r) {
    SamplingParams p = kinds[size_t(r) % kinds.size()];
    p.seed = rng();
    std::vector<int32_t> prompt(40);
    for (int32_t& t : prompt) t = int32_t(rng() % uint64_t(V));
    samplers.emplace_back(p, prompt);
  }
  cuda::DeviceSampler device(rows, V);
  cuda::DeviceArray<float> d_logits(size_t(rows * V));
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  std::vector<float> logits(size_t(rows * V));
  int64_t drawn = 0;
  double device_ms = 0;
  for (int step = 0; step < steps; ++step) {
    // Peaked rows and flat rows (scale 8 and 0.5), with exact ties in some.
    for (int64_t r = 0; r < rows; ++r) {
      const float scale = (r + step) % 2 ? 8.0f : 0.5f;
      for (int64_t j = 0; j < V; ++j) logits[size_t(r * V + j)] = scale * testing::uniform(seed + uint64_t(step), uint64_t(r * V + j));
      if (r % 5 == 0) logits[size_t(r * V + 7)] = logits[size_t(r * V + 3)];
    }
    std::vector<RowSampling> step_rows;
    for (int64_t r = 0; r < rows; ++r) {
      step_rows.push_back(samplers[size_t(r)].next_row());
      step_rows.back().active = (r + step) % 7 != 6;
    }
    SampledRows host, gpu;
    sample_rows_host(logits, V, step_rows, host);
    ASSERT_EQ(cudaMemcpy(d_logits.get(), logits.data(), logits.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    const auto t0 = std::chrono::steady_clock::now();
    device.sample(d_logits.get(), step_rows, stream, gpu);
    device_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_EQ(gpu.top_n, host.top_n);
    for (int64_t r = 0; r < rows; ++r) {
      SCOPED_TRACE(::testing::Message() << "step " << step << " row " << r << " (rule " << r % int64_t(kinds.size()) << ")");
      if (!step_rows[size_t(r)].active) {
        EXPECT_EQ(gpu.ids[size_t(r)], -1);
        continue;
      }
      ++drawn;
      EXPECT_EQ(gpu.ids[size_t(r)], host.ids[size_t(r)]);
      EXPECT_NEAR(gpu.logprobs[size_t(r)], host.logprobs[size_t(r)], 1e-5 * (1 + std::fabs(host.logprobs[size_t(r)])));
      for (int32_t k = 0; k < step_rows[size_t(r)].rule.top_logprobs; ++k) {
        const size_t at = size_t(r) * size_t(host.top_n) + size_t(k);
        EXPECT_EQ(gpu.top_ids[at], host.top_ids[at]) << "top " << k;
        EXPECT_NEAR(gpu.top_logprobs[at], host.top_logprobs[at], 1e-5 * (1 + std::fabs(host.top_logprobs[at])));
      }
      samplers[size_t(r)].record(host, size_t(r));  // both follow the same history
    }
    if (::testing::Test::HasFailure()) break;
  }
  std::printf("%lld draws equal; device sampling %.3f ms per step of %lld rows\n", (long long)drawn,
              device_ms / steps, (long long)rows);
  cudaStreamDestroy(stream);
}

TEST(DeviceSampler, PicksTheHostSamplersTokens) {
  NIBBLE_REQUIRE_GPU();
  compare_case(80, 5003, 12);
}

TEST(DeviceSampler, PicksTheHostSamplersTokensOverA128kVocabulary) {
  NIBBLE_REQUIRE_GPU();
  compare_case(9, 128256, 4);
}

}  // namespace
}  // namespace nibble
