// GPTQ against a small, independent float64 implementation (explicit inverse, column-by-column
// updates of every later column, no lazy batches), and against RTN on correlated inputs.
#include <cmath>
#include <random>

#include <gtest/gtest.h>
#include <omp.h>

#include "nibble/core/error.h"
#include "nibble/core/interrupt.h"
#include "nibble/quant/gptq.h"

namespace nibble::quant {
namespace {

using Mat = std::vector<double>;

// Cholesky L Lᵀ = A (lower), naive.
Mat cholesky_lower(const Mat& A, int64_t n) {
  Mat L(size_t(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double s = A[size_t(i * n + j)];
      for (int64_t k = 0; k < j; ++k) s -= L[size_t(i * n + k)] * L[size_t(j * n + k)];
      L[size_t(i * n + j)] = i == j ? std::sqrt(s) : s / L[size_t(j * n + j)];
    }
  return L;
}

// Inverse by Gauss-Jordan elimination with partial pivoting.
Mat inverse(Mat A, int64_t n) {
  Mat I(size_t(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) I[size_t(i * n + i)] = 1;
  for (int64_t c = 0; c < n; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < n; ++r)
      if (std::abs(A[size_t(r * n + c)]) > std::abs(A[size_t(p * n + c)])) p = r;
    for (int64_t k = 0; k < n; ++k) {
      std::swap(A[size_t(c * n + k)], A[size_t(p * n + k)]);
      std::swap(I[size_t(c * n + k)], I[size_t(p * n + k)]);
    }
    const double d = A[size_t(c * n + c)];
    for (int64_t k = 0; k < n; ++k) {
      A[size_t(c * n + k)] /= d;
      I[size_t(c * n + k)] /= d;
    }
    for (int64_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = A[size_t(r * n + c)];
      for (int64_t k = 0; k < n; ++k) {
        A[size_t(r * n + k)] -= f * A[size_t(c * n + k)];
        I[size_t(r * n + k)] -= f * I[size_t(c * n + k)];
      }
    }
  }
  return I;
}

struct Problem {
  int64_t N, K, T;
  std::vector<float> W, X;  // [N, K], [T, K]
  Mat H;                    // XᵀX
};

// Inputs with strongly correlated channels (a few latent factors plus noise), where GPTQ's
// error compensation has something to work with.
Problem make_problem(int64_t N, int64_t K, int64_t T, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0, 1);
  Problem p{N, K, T, std::vector<float>(size_t(N * K)), std::vector<float>(size_t(T * K)), Mat(size_t(K * K), 0.0)};
  for (auto& w : p.W) w = nd(rng) * 0.05f;
  const int64_t F = 8;
  std::vector<float> mix(size_t(F * K));
  for (auto& m : mix) m = nd(rng);
  for (int64_t t = 0; t < T; ++t) {
    float f[8];
    for (auto& v : f) v = nd(rng);
    for (int64_t k = 0; k < K; ++k) {
      float x = 0.3f * nd(rng);
      for (int64_t j = 0; j < F; ++j) x += f[j] * mix[size_t(j * K + k)];
      p.X[size_t(t * K + k)] = x;
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) p.H[size_t(i * K + j)] += double(p.X[size_t(t * K + i)]) * p.X[size_t(t * K + j)];
  return p;
}

// What the reference GPTQ produces: codes and scales as gptq_quantize stores them, and the
// dequantized weight [N, K] (main columns then keepers).
struct ReferenceResult {
  std::vector<uint8_t> codes, keeper_codes;  // [N, M], [N, keeper]
  std::vector<float> scales, keeper_scales;  // [N / row_group, M / group], [N]
  std::vector<float> dequantized;
};

// Reference GPTQ: U = upper Cholesky factor of (H + damp)⁻¹; every column's error is applied to all
// later columns immediately, keeper columns included (they are quantized from the compensated
// weights, as gptq.h says). Group scales come from the updated weights when a group starts; the
// keepers' per-row scale when the first keeper column is reached.
ReferenceResult reference_gptq(const Problem& p, const LinearQuantSpec& spec, double percdamp) {
  const int64_t N = p.N, K = p.K, M = K - spec.keeper, G = spec.weight.group, R = spec.weight.row_group;
  const FormatSpec kspec = *keeper_spec(spec.keeper_precision);
  Mat H = p.H;
  double mean = 0;
  for (int64_t i = 0; i < K; ++i) mean += H[size_t(i * K + i)];
  mean /= double(K);
  for (int64_t i = 0; i < K; ++i) H[size_t(i * K + i)] += percdamp * mean;
  const Mat Hinv = inverse(H, K);
  // Upper factor U with Hinv = Uᵀ U is the transpose of the lower factor of Hinv.
  const Mat L = cholesky_lower(Hinv, K);
  auto U = [&](int64_t i, int64_t j) { return L[size_t(j * K + i)]; };
  Mat W(p.W.begin(), p.W.end());
  ReferenceResult r{std::vector<uint8_t>(size_t(N * M)), std::vector<uint8_t>(size_t(N * spec.keeper)),
                    std::vector<float>(size_t(N / R * (M / G))), std::vector<float>(size_t(N)),
                    std::vector<float>(size_t(N * K))};
  std::vector<GroupScale> scale(static_cast<size_t>(N));
  for (int64_t i = 0; i < K; ++i) {
    const bool keeper = i >= M;
    if (!keeper && i % G == 0)
      for (int64_t n0 = 0; n0 < N; n0 += R) {
        GroupStats s;
        for (int64_t n = n0; n < n0 + R; ++n)
          for (int64_t k = i; k < i + G; ++k) s.add(float(W[size_t(n * K + k)]));
        const GroupScale g = choose_scale(spec.weight, s);
        r.scales[size_t(n0 / R * (M / G) + i / G)] = g.scale;
        for (int64_t n = n0; n < n0 + R; ++n) scale[size_t(n)] = g;
      }
    if (i == M)
      for (int64_t n = 0; n < N; ++n) {
        GroupStats s;
        for (int64_t k = M; k < K; ++k) s.add(float(W[size_t(n * K + k)]));
        scale[size_t(n)] = choose_scale(kspec, s);
        r.keeper_scales[size_t(n)] = scale[size_t(n)].scale;
      }
    const Format f = keeper ? kspec.format : spec.weight.format;
    for (int64_t n = 0; n < N; ++n) {
      const double w = W[size_t(n * K + i)];
      const uint8_t c = encode_element(f, float(w), scale[size_t(n)]);
      (keeper ? r.keeper_codes[size_t(n * spec.keeper + i - M)] : r.codes[size_t(n * M + i)]) = c;
      const float q = decode_element(f, c, scale[size_t(n)]);
      r.dequantized[size_t(n * K + i)] = q;
      const double e = (w - q) / U(i, i);
      for (int64_t j = i + 1; j < K; ++j) W[size_t(n * K + j)] -= e * U(i, j);
    }
  }
  return r;
}

double output_error(const Problem& p, const std::vector<float>& Q) {
  double err = 0;
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t n = 0; n < p.N; ++n) {
      double a = 0, b = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        a += double(p.X[size_t(t * p.K + k)]) * p.W[size_t(n * p.K + k)];
        b += double(p.X[size_t(t * p.K + k)]) * Q[size_t(n * p.K + k)];
      }
      err += (a - b) * (a - b);
    }
  return err;
}

LinearQuantSpec int4_spec(int64_t group, int row_group, int64_t keeper) {
  LinearQuantSpec s;
  s.weight = FormatSpec{Format::Int4Sym, int(group), row_group, 0.85f};
  s.keeper = keeper;
  s.keeper_precision = KeeperPrecision::Int8;
  return s;
}

// Codes, keeper codes, main and keeper scales against the float64 reference; the layer's output
// error within 5% of the reference's own (the lazy batches and BLAS change only summation order).
TEST(Gptq, SameAsFloat64Reference) {
  for (const auto& [group, row_group, keeper] :
       {std::tuple{32, 1, 0}, std::tuple{32, 2, 32}, std::tuple{96, 1, 0}, std::tuple{96, 1, 64}}) {
    const uint32_t seed = 11 + uint32_t(group) + uint32_t(keeper);
    SCOPED_TRACE(::testing::Message() << "group " << group << " row_group " << row_group << " keeper " << keeper
                                      << " seed " << seed);
    const Problem p = make_problem(16, 96 + keeper, 400, seed);
    const LinearQuantSpec spec = int4_spec(group, row_group, keeper);
    GptqOptions opt;
    opt.block = 40;  // not a multiple of the group: lazy batches must not change the result
    const GptqResult got = gptq_quantize(p.W, p.N, p.K, p.H, spec, opt, "test");
    const ReferenceResult ref = reference_gptq(p, spec, opt.percdamp);
    // Summation order differs, so a code sitting within ~1e-12 of a rounding tie may flip.
    int64_t mismatches = 0;
    for (size_t i = 0; i < ref.codes.size(); ++i) mismatches += got.main.codes[i] != ref.codes[i];
    EXPECT_LE(mismatches, 1);
    EXPECT_EQ(got.main.scales, ref.scales);
    if (keeper > 0) {
      ASSERT_TRUE(got.keepers.has_value());
      EXPECT_EQ(got.keepers->codes, ref.keeper_codes);
      EXPECT_EQ(got.keepers->scales, ref.keeper_scales);
    }
    const auto q = QuantLinear(spec, {}, got.main, got.keepers, got.keeper_fp16, {});
    const double e_got = output_error(p, q.dequantized()), e_ref = output_error(p, ref.dequantized);
    std::printf("group %d keeper %d: output error %.6g, float64 reference %.6g\n", group, keeper, e_got, e_ref);
    EXPECT_LE(e_got, 1.05 * e_ref);
  }
}

TEST(Gptq, BeatsRoundToNearestOnCorrelatedInputs) {
  const Problem p = make_problem(32, 256, 600, 5);
  const LinearQuantSpec spec = int4_spec(64, 1, 64);
  const GptqResult g = gptq_quantize(p.W, p.N, p.K, p.H, spec, GptqOptions{}, "test");
  const auto gptq = QuantLinear(spec, {}, g.main, g.keepers, g.keeper_fp16, {});
  const auto rtn = quantize_linear_rtn(p.W, p.N, p.K, spec, {}, {}, "test");
  const double e_gptq = output_error(p, gptq.dequantized()), e_rtn = output_error(p, rtn->dequantized());
  std::printf("output error: GPTQ %.4g, RTN %.4g (ratio %.3f)\n", e_gptq, e_rtn, e_gptq / e_rtn);
  EXPECT_LT(e_gptq, 0.7 * e_rtn);
}

// The per-group clip search picks, per block, the clip with the least diag(H)-weighted rounding
// error; on heavy-tailed weights it must not lose to the fixed clip it replaces.
TEST(Gptq, ClipSearchDoesNotLoseToFixedClip) {
  Problem p = make_problem(32, 256, 600, 9);
  std::mt19937 rng(10);
  std::student_t_distribution<float> heavy(2.0f);
  for (auto& w : p.W) w = 0.02f * heavy(rng);
  const LinearQuantSpec spec = int4_spec(64, 2, 0);
  GptqOptions fixed, search;
  search.clip_search = true;
  const GptqResult a = gptq_quantize(p.W, p.N, p.K, p.H, spec, fixed, "test");
  const GptqResult b = gptq_quantize(p.W, p.N, p.K, p.H, spec, search, "test");
  const auto qa = QuantLinear(spec, {}, a.main, a.keepers, a.keeper_fp16, {});
  const auto qb = QuantLinear(spec, {}, b.main, b.keepers, b.keeper_fp16, {});
  const double ea = output_error(p, qa.dequantized()), eb = output_error(p, qb.dequantized());
  std::printf("output error: fixed clip 0.85 %.4g, clip search %.4g\n", ea, eb);
  EXPECT_NE(a.main.scales, b.main.scales);
  EXPECT_LT(eb, ea);
}

// --w-clip-gptq-loss: per row group, the clip whose GPTQ loss is least, i.e. the scale and loss of
// the best of the 11 fixed-clip GPTQ runs on that row group alone (one group per row, so no later
// group depends on the choice). The diag(H)-weighted search, blind to the compensation, loses to it.
TEST(Gptq, ClipSearchByGptqLossPicksTheBestFixedClip) {
  Problem p = make_problem(8, 64, 300, 12);
  std::mt19937 rng(13);
  std::student_t_distribution<float> heavy(2.0f);
  for (auto& w : p.W) w = 0.02f * heavy(rng);
  const int row_group = 2;
  GptqOptions by_loss, by_hdiag;
  by_loss.clip_search = by_hdiag.clip_search = true;
  by_loss.clip_by_gptq_loss = true;
  const GptqResult got = gptq_quantize(p.W, p.N, p.K, p.H, int4_spec(64, row_group, 0), by_loss, "test");
  const GptqResult hdiag = gptq_quantize(p.W, p.N, p.K, p.H, int4_spec(64, row_group, 0), by_hdiag, "test");
  double best_total = 0;
  for (int64_t rg = 0; rg < p.N / row_group; ++rg) {
    const std::vector<float> rows(p.W.begin() + rg * row_group * p.K, p.W.begin() + (rg + 1) * row_group * p.K);
    GptqResult best;
    best.loss = -1;
    for (int step = 0; step <= 10; ++step) {
      LinearQuantSpec fixed = int4_spec(64, row_group, 0);
      fixed.weight.clip = 1.0f - 0.05f * float(step);  // the search's own grid
      GptqResult r = gptq_quantize(rows, row_group, p.K, p.H, fixed, GptqOptions{}, "test");
      if (best.loss < 0 || r.loss < best.loss) best = std::move(r);
    }
    EXPECT_EQ(got.main.scales[size_t(rg)], best.main.scales[0]) << "row group " << rg;
    best_total += best.loss;
  }
  std::printf("GPTQ loss: best fixed clips %.6g, search by GPTQ loss %.6g, by diag(H) %.6g\n", best_total, got.loss,
              hdiag.loss);
  EXPECT_NEAR(got.loss, best_total, 1e-9 * best_total);
  EXPECT_GT(hdiag.loss, got.loss);
}

// The rows of a block run in parallel, in chunks of whole row groups (gptq.cpp): no code or scale
// may depend on the thread count. 200 rows: chunks of 64 and a partial one. Called directly (not
// inside quantize's loop over linears), the lazy update's host DGEMM runs threaded too and OpenBLAS
// sums in another order at another thread count: the loss agrees to the last bits only.
TEST(Gptq, SameResultAtAnyThreadCount) {
  const Problem p = make_problem(200, 96 + 32, 300, 21);
  const LinearQuantSpec spec = int4_spec(32, 2, 32);
  GptqOptions opt;
  opt.clip_search = true;
  const int saved = omp_get_max_threads();
  GptqResult r[2];
  for (int t : {0, 1}) {
    omp_set_num_threads(t == 0 ? 1 : 3);
    r[t] = gptq_quantize(p.W, p.N, p.K, p.H, spec, opt, "test");
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(r[0].main.codes, r[1].main.codes);
  EXPECT_EQ(r[0].main.scales, r[1].main.scales);
  ASSERT_TRUE(r[0].keepers.has_value() && r[1].keepers.has_value());
  EXPECT_EQ(r[0].keepers->codes, r[1].keepers->codes);
  EXPECT_EQ(r[0].keepers->scales, r[1].keepers->scales);
  EXPECT_NEAR(r[0].loss, r[1].loss, 1e-12 * r[0].loss);
}

TEST(Gptq, DeadChannelsAreZeroed) {
  Problem p = make_problem(8, 64, 100, 3);
  for (int64_t k = 0; k < p.K; ++k) p.H[size_t(5 * p.K + k)] = p.H[size_t(k * p.K + 5)] = 0;
  const GptqResult g = gptq_quantize(p.W, p.N, p.K, p.H, int4_spec(32, 1, 0), GptqOptions{}, "test");
  for (int64_t n = 0; n < p.N; ++n) EXPECT_EQ(g.main.codes[size_t(n * p.K + 5)], 0);
}

// Ctrl-C during GPTQ (minutes for a 7B down_proj on a CPU) stops it at the next block, naming the
// linear, instead of after the whole layer; the flag is taken by that one throw.
TEST(Gptq, InterruptStopsAtTheNextBlock) {
  Problem p = make_problem(8, 64, 100, 4);
  request_interrupt();
  try {
    gptq_quantize(p.W, p.N, p.K, p.H, int4_spec(32, 1, 0), GptqOptions{}, "layer 3 down_proj");
    FAIL() << "GPTQ ran to the end after a signal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 3 down_proj: interrupted"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(gptq_quantize(p.W, p.N, p.K, p.H, int4_spec(32, 1, 0), GptqOptions{}, "test"));
}

}  // namespace
}  // namespace nibble::quant
