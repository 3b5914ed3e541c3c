// The CPU attention kernel against a float64 loop: causal GQA over several query blocks, a cached
// prefix (start > 0), sliding windows, and single-token decode.
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "nibble/backend/cpu/ops.h"

namespace nibble {
namespace {

// out[i, h] = Σ_j softmax_j(q_i·k_j / sqrt(d)) v_j over keys j visible from position start + i.
std::vector<double> attention_reference(const std::vector<float>& q, const std::vector<float>& k,
                                        const std::vector<float>& v, int64_t n, int64_t start, int64_t heads,
                                        int64_t kv_heads, int64_t d, int64_t window) {
  std::vector<double> out(size_t(n * heads * d), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t kvh = h / (heads / kv_heads), pos = start + i;
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      std::vector<double> s;
      for (int64_t j = first; j <= pos; ++j) {
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += double(q[size_t((i * heads + h) * d + c)]) * k[size_t((j * kv_heads + kvh) * d + c)];
        s.push_back(dot / std::sqrt(double(d)));
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int64_t j = first; j <= pos; ++j)
        for (int64_t c = 0; c < d; ++c)
          out[size_t((i * heads + h) * d + c)] += s[size_t(j - first)] / sum * v[size_t((j * kv_heads + kvh) * d + c)];
    }
  return out;
}

struct Case {
  int64_t n, start, heads, kv_heads, d, window;
};

class CpuAttention : public ::testing::TestWithParam<Case> {};

TEST_P(CpuAttention, MatchesFloat64Loop) {
  const Case c = GetParam();
  const int64_t total = c.start + c.n;
  std::mt19937 rng(uint32_t(c.n * 131 + c.start * 7 + c.window));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  auto fill = [&](int64_t count) {
    std::vector<float> x(static_cast<size_t>(count));
    for (float& e : x) e = 2.0f * dist(rng);  // wide scores: the softmax is far from uniform
    return x;
  };
  const auto q = fill(c.n * c.heads * c.d);
  const auto k = fill(total * c.kv_heads * c.d), v = fill(total * c.kv_heads * c.d);
  std::vector<float> out(size_t(c.n * c.heads * c.d), std::nanf(""));  // poisoned: every value must be written
  cpu::attention(q.data(), k.data(), v.data(), c.n, c.start, c.heads, c.kv_heads, c.d, c.window, out.data());
  const auto ref = attention_reference(q, k, v, c.n, c.start, c.heads, c.kv_heads, c.d, c.window);
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_TRUE(std::isfinite(out[i])) << "element " << i << " not written";
    worst = std::max(worst, std::abs(double(out[i]) - ref[i]));
  }
  EXPECT_LT(worst, 1e-4) << "n " << c.n << " start " << c.start << " window " << c.window;
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuAttention,
                         ::testing::Values(Case{300, 0, 4, 2, 32, 0},      // three query blocks, GQA
                                           Case{130, 70, 6, 2, 16, 0},     // a cached prefix, blocks off the grid
                                           Case{1, 257, 4, 4, 32, 0},      // one decode step
                                           Case{300, 0, 4, 1, 16, 100},    // sliding window inside a block
                                           Case{200, 90, 2, 2, 16, 40},    // window and prefix
                                           Case{1, 300, 4, 2, 16, 64}));   // windowed decode

}  // namespace
}  // namespace nibble
