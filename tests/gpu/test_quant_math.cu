// `nibble quantize --device cuda`'s arithmetic (quant/device_math.h) against the CPU reference:
//  - the statistics (Σx², Σ|x| in float64; XᵀX as fp32 SSYRK per add, summed in float64) against
//    a float64 loop, to the bound the CPU's own test uses (1e-5 of the largest entry for XᵀX);
//  - the inverse-Hessian factor by cuSOLVER against LAPACK's (1e-9 relative);
//  - GPTQ's codes on the device against the CPU's: equal except where the two DGEMMs' summation
//    orders move a value across a rounding boundary (a tie to 1e-9); those are counted and printed;
//  - a whole quantization of stories260K (streamed, --device cuda against cpu): the packed codes
//    differ at few places, counted and printed per tensor.
// Seeds are fresh on every run and printed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>

#include "gpu_test_util.h"
#include "nibble/core/progress.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/calibrate.h"
#include "nibble/quant/device_math.h"
#include "nibble/quant/gptq.h"
#include "nibble/quant/quantize_checkpoint.h"
#include "nibble/quant/recipe.h"

namespace nibble::quant {
namespace {

using nibble::testing::fresh_seed;

// x [rows, dim]: normal values, a few outlier channels (what salience sorting is for).
std::vector<float> random_inputs(std::mt19937_64& rng, int64_t rows, int64_t dim) {
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(rows * dim));
  for (int64_t i = 0; i < rows * dim; ++i) x[size_t(i)] = nd(rng) * (i % dim % 37 == 5 ? 20.0f : 1.0f);
  return x;
}

TEST(QuantMath, StatisticsMatchAFloat64Loop) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t dim = 300;
  InputStats dev(dim, true, /*on_device=*/true), cpu(dim, true);
  std::vector<double> sq(static_cast<size_t>(dim)), ab(static_cast<size_t>(dim)), xtx(static_cast<size_t>(dim * dim));
  for (int64_t rows : {1, 257, 1024}) {
    const std::vector<float> x = random_inputs(rng, rows, dim);
    dev.add(x.data(), rows);
    cpu.add(x.data(), rows);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < dim; ++i) {
        const double v = x[size_t(r * dim + i)];
        sq[size_t(i)] += v * v;
        ab[size_t(i)] += std::abs(v);
        for (int64_t j = 0; j < dim; ++j) xtx[size_t(i * dim + j)] += v * x[size_t(r * dim + j)];
      }
  }
  EXPECT_EQ(dev.count(), 1 + 257 + 1024);
  for (int64_t i = 0; i < dim; ++i) {
    ASSERT_NEAR(dev.sum_sq()[size_t(i)], sq[size_t(i)], 1e-12 * sq[size_t(i)]) << "channel " << i << " seed " << seed;
    ASSERT_NEAR(dev.sum_abs()[size_t(i)], ab[size_t(i)], 1e-12 * ab[size_t(i)]) << "channel " << i;
  }
  double xmax = 0;
  for (double v : xtx) xmax = std::max(xmax, std::abs(v));
  const std::vector<double> got = dev.xtx(), ref_cpu = cpu.xtx();
  double worst = 0, worst_cpu = 0;
  for (int64_t i = 0; i < dim * dim; ++i) {
    worst = std::max(worst, std::abs(got[size_t(i)] - xtx[size_t(i)]) / xmax);
    worst_cpu = std::max(worst_cpu, std::abs(ref_cpu[size_t(i)] - xtx[size_t(i)]) / xmax);
  }
  std::printf("XtX, largest error / largest entry: device %.2e, CPU %.2e (float64 loop as truth)\n", worst, worst_cpu);
  EXPECT_LE(worst, 1e-5) << "seed " << seed;
}

TEST(QuantMath, InverseHessianFactorMatchesLapack) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t K = 384, rows = 2048;
  InputStats st(K, true);
  const std::vector<float> x = random_inputs(rng, rows, K);
  st.add(x.data(), rows);
  std::vector<char> dead_cpu, dead_dev;
  const std::vector<double> cpu = gptq_inverse_hessian_factor(st.xtx(), K, 0.01, &dead_cpu, "cpu");
  const std::vector<double> dev = gptq_inverse_hessian_factor(st.xtx(), K, 0.01, &dead_dev, "cuda", true);
  EXPECT_EQ(dead_cpu, dead_dev);
  double umax = 0, diff = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    umax = std::max(umax, std::abs(cpu[i]));
    diff = std::max(diff, std::abs(cpu[i] - dev[i]));
  }
  std::printf("inverse-Hessian factor: largest difference %.2e of largest entry %.2e\n", diff, umax);
  EXPECT_LE(diff, 1e-9 * umax) << "seed " << seed;
}

int64_t differing(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

// Atom's linear (groups of 128, row pairs, 128 INT8 keepers, clip search, group Hadamard off).
TEST(QuantMath, GptqCodesMatchTheCpuButForTies) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t N = 256, K = 640, rows = 4096;
  Recipe r = Recipe::preset("atom-w4a4");
  r.group_hadamard = false;
  const LinearQuantSpec spec = r.linear_spec(K, "test");
  InputStats st(K, true);
  const std::vector<float> x = random_inputs(rng, rows, K);
  st.add(x.data(), rows);
  std::normal_distribution<float> nd;
  std::vector<float> W(size_t(N * K));
  for (float& w : W) w = nd(rng) * 0.02f;
  GptqOptions opt;
  opt.clip_search = true;
  const GptqResult cpu = gptq_quantize(W, N, K, st.xtx(), spec, opt, "cpu");
  opt.on_device = true;
  const GptqResult dev = gptq_quantize(W, N, K, st.xtx(), spec, opt, "cuda");
  const int64_t main_diff = differing(cpu.main.codes, dev.main.codes);
  const int64_t keeper_diff = differing(cpu.keepers->codes, dev.keepers->codes);
  std::printf("GPTQ codes differing (rounding ties): main %lld of %zu, keepers %lld of %zu; loss %.6g vs %.6g\n",
              (long long)main_diff, cpu.main.codes.size(), (long long)keeper_diff, cpu.keepers->codes.size(), cpu.loss,
              dev.loss);
  EXPECT_LE(main_diff, int64_t(cpu.main.codes.size()) / 1000) << "seed " << seed;
  EXPECT_LE(keeper_diff, int64_t(cpu.keepers->codes.size()) / 1000) << "seed " << seed;
  EXPECT_NEAR(dev.loss, cpu.loss, 1e-3 * cpu.loss);
}

TEST(QuantMath, Stories260KPackedCodesMatchTheCpuButForTies) {
  NIBBLE_REQUIRE_GPU();
  const char* data = std::getenv("NIBBLE_DATA");
  const std::filesystem::path model = std::filesystem::path(data ? data : "data") / "models/stories260K";
  if (!std::filesystem::exists(model / "model.safetensors")) GTEST_SKIP() << "no " << model;
  Progress::set_quiet(true);
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  std::vector<int32_t> calib(4096);
  for (auto& t : calib) t = int32_t(rng() % 512);
  Recipe r = Recipe::preset("atom-w4a4");
  r.weight.group = r.act.group = 32;
  r.keeper = 8;
  r.calib_windows = 8;
  r.calib_ctx = 128;
  const auto dir = std::filesystem::temp_directory_path();
  std::shared_ptr<SafetensorsFile> files[2];
  for (int device = 0; device < 2; ++device) {
    CheckpointQuantizeOptions opt;
    opt.model = opt.tokenizer = model;
    opt.out = dir / (device ? "nibble_gpu_q.safetensors" : "nibble_cpu_q.safetensors");
    opt.show_progress = false;
    opt.on_device = device == 1;
    quantize_checkpoint(r, calib, opt);
    files[device] = SafetensorsFile::open(opt.out);
  }
  int64_t total = 0, diff = 0;
  for (const auto& [name, t] : files[0]->tensors()) {
    const TensorInfo& u = files[1]->get(name);
    ASSERT_EQ(t.nbytes, u.nbytes) << name;
    int64_t d = 0;
    for (size_t i = 0; i < t.nbytes; ++i) d += t.data[i] != u.data[i];
    if (name.ends_with("codes")) {
      total += int64_t(t.nbytes);
      diff += d;
      if (d) std::printf("  %s: %lld of %zu code bytes differ\n", name.c_str(), (long long)d, t.nbytes);
    } else if (name.ends_with("perm")) {
      EXPECT_EQ(d, 0) << name << ": the channel order moved (seed " << seed << ")";
    }
  }
  std::printf("stories260K: %lld of %lld packed code bytes differ between --device cuda and cpu\n", (long long)diff,
              (long long)total);
  EXPECT_LE(diff, total / 100) << "seed " << seed;
}

}  // namespace
}  // namespace nibble::quant
