// The W8A8 linear on the GPU (linear_w8a8.h) against quant/format.h and the CPU's QuantLinear:
//  - the per-token quantizer's codes and scales equal format.h's encode_group of the same fp16 row
//    (gathered by the permutation), exactly: both sides quantize the same fp16 values;
//  - the whole linear (quantize → cuBLASLt INT8 GEMM → rescale) equals the exact integer product of
//    those codes times the two scales (+ bias) to one fp16 rounding, and the CPU QuantLinear's
//    forward on the same fp16 input to that plus the CPU's fp32 summation error;
//  - the shapes and variants with no kernel are refused at upload, naming what.
// Row counts 1, 3, 17, 64, 300 land in different row buckets of one W8A8Gemm (each bucket's
// algorithm is chosen for its largest count). Seeds are fresh on every run and printed.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>

#include "gpu_test_util.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/linear_w8a8.h"
#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/quant/format.h"
#include "nibble/quant/quant_linear.h"
#include "nibble/quant/recipe.h"

namespace nibble::cuda {
namespace {

struct Case {
  int64_t rows, N, K;
  bool bias, perm;
  float clip;
};

// The recipe w8a8's spec (INT8 weights per output channel, INT8 activations per token), with an
// activation clip.
quant::LinearQuantSpec w8a8_spec(float act_clip) {
  quant::LinearQuantSpec s = quant::Recipe::preset("w8a8").linear_spec(64, "test");
  s.act->clip = act_clip;
  return s;
}

std::unique_ptr<quant::QuantLinear> random_w8a8(uint64_t seed, int64_t N, int64_t K, bool bias, bool permute,
                                                const quant::LinearQuantSpec& spec) {
  std::vector<float> w = testing::random_matrix(seed, N, K, 1.0f / std::sqrt(float(K)), 0);
  std::vector<float> b;
  for (int64_t n = 0; bias && n < N; ++n) b.push_back(round_fp16(0.5f * testing::uniform(seed + 1, uint64_t(n))));
  std::vector<int32_t> perm;
  if (permute) {
    perm.resize(size_t(K));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed + 2));
  }
  return quant::quantize_linear_rtn(w, N, K, spec, perm, b, "test weight");
}

// The spacing of fp16 values around v (2^-24 below the normal range).
double fp16_ulp(double v) {
  const double a = std::max(std::fabs(v), 0x1p-14);
  return std::ldexp(1.0, std::ilogb(a) - 10);
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* p = nullptr;
  NIBBLE_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(host.size(), 1) * sizeof(T)));
  NIBBLE_CUDA_CHECK(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

template <typename T>
std::vector<T> host_copy(const T* p, size_t n) {
  std::vector<T> host(n);
  NIBBLE_CUDA_CHECK(cudaMemcpy(host.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

void run_case(W8A8Gemm& gemm, const Case& c, uint64_t seed) {
  std::printf("seed %llu: rows %lld, %lld x %lld (out x in), bias %d, perm %d, clip %.2f\n", (unsigned long long)seed,
              (long long)c.rows, (long long)c.N, (long long)c.K, int(c.bias), int(c.perm), c.clip);
  const int64_t N = c.N, K = c.K, R = c.rows;
  const quant::LinearQuantSpec spec = w8a8_spec(c.clip);
  auto q = random_w8a8(seed, N, K, c.bias, c.perm, spec);
  const W8A8Weights w = upload_w8a8(*q, "test");
  // cuBLASLt documents multiples of 4 but may lack kernels for shapes that are not multiples of 8
  // (PyTorch's _int_mm asks for 8): there a refusal at load naming the shape is the right answer.
  try {
    gemm.prepare(w);
  } catch (const Error& e) {
    if (N % 8 == 0 && K % 8 == 0) throw;
    std::printf("  refused at load: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find(std::to_string(N) + " x " + std::to_string(K)), std::string::npos);
    return;
  }

  // Inputs with ranges varying by row and group, rounded to fp16: what both sides see.
  std::vector<float> x = testing::random_matrix(seed + 3, R, K, 2.0f, 0);
  std::vector<uint16_t> x16(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x16[i] = float_to_fp16(x[i]);
    x[i] = fp16_to_float(x16[i]);
  }
  __half* dx = device_copy(std::vector<__half>(reinterpret_cast<const __half*>(x16.data()),
                                               reinterpret_cast<const __half*>(x16.data()) + x16.size()));
  int8_t* dcodes = nullptr;
  float* dscales = nullptr;
  __half* dy = nullptr;
  NIBBLE_CUDA_CHECK(cudaMalloc(&dcodes, size_t(R * K)));
  NIBBLE_CUDA_CHECK(cudaMalloc(&dscales, size_t(R) * 4));
  NIBBLE_CUDA_CHECK(cudaMalloc(&dy, size_t(R * N) * 2));

  // 1. The quantizer alone, against format.h on the gathered row.
  quantize_rows_int8(dx, R, K, w.perm.get(), c.clip, dcodes, dscales, nullptr);
  gemm.run(w, dx, R, dy, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<int8_t> codes = host_copy(dcodes, size_t(R * K));
  const std::vector<float> scales = host_copy(dscales, size_t(R));
  const std::vector<__half> y = host_copy(dy, size_t(R * N));
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dcodes), static_cast<void*>(dscales),
                  static_cast<void*>(dy)})
    NIBBLE_CUDA_CHECK(cudaFree(p));

  std::vector<uint8_t> ref_codes(static_cast<size_t>(R * K));
  std::vector<float> ref_scales(static_cast<size_t>(R)), row(static_cast<size_t>(K));
  int64_t bad_codes = 0, bad_scales = 0;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < K; ++k) row[size_t(k)] = x[size_t(r * K + (c.perm ? q->perm()[size_t(k)] : k))];
    ref_scales[size_t(r)] = quant::encode_group(*spec.act, row.data(), K, ref_codes.data() + r * K).scale;
    bad_scales += scales[size_t(r)] != ref_scales[size_t(r)];
    for (int64_t k = 0; k < K; ++k) bad_codes += int8_t(ref_codes[size_t(r * K + k)]) != codes[size_t(r * K + k)];
  }
  EXPECT_EQ(bad_scales, 0) << "of " << R << " row scales differ from format.h's";
  EXPECT_EQ(bad_codes, 0) << "of " << R * K << " codes differ from format.h's";

  // 2. The linear: the exact product of format.h's codes, and the CPU QuantLinear.
  std::vector<float> cpu(static_cast<size_t>(R * N));
  q->forward(x.data(), R, cpu.data());
  const quant::QuantizedMatrix& m = q->main();
  // Per row: the largest error over its bound, for the exact product and for the CPU.
  std::vector<double> worst_exact(static_cast<size_t>(R)), worst_cpu(static_cast<size_t>(R));
  testing::parallel_for(R, [&](int64_t r) {
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0, abs_acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t p = int64_t(int8_t(ref_codes[size_t(r * K + k)])) * int8_t(m.codes[size_t(n * K + k)]);
        acc += p;
        abs_acc += std::abs(p);
      }
      const double s = double(ref_scales[size_t(r)]) * m.group_scale(n, 0).scale;
      const double b = c.bias ? q->bias()[size_t(n)] : 0.0;
      const double exact = double(acc) * s + b, magnitude = double(abs_acc) * s + std::fabs(b);
      const double gpu = __half2float(y[size_t(r * N + n)]), ref_cpu = cpu[size_t(r * N + n)];
      // One fp16 rounding of the result, plus the epilogue's fp32 products (relative 2^-22 of the product).
      const double e_exact = std::fabs(gpu - exact) / (fp16_ulp(exact) + 0x1p-22 * magnitude);
      // The CPU sums K fp32 products (OpenBLAS, blocked): a few 1e-7 of the terms' magnitude.
      const double e_cpu = std::fabs(gpu - ref_cpu) / (fp16_ulp(ref_cpu) + 1e-5 * magnitude);
      worst_exact[size_t(r)] = std::max(worst_exact[size_t(r)], e_exact);
      worst_cpu[size_t(r)] = std::max(worst_cpu[size_t(r)], e_cpu);
    }
  });
  const double we = *std::max_element(worst_exact.begin(), worst_exact.end());
  const double wc = *std::max_element(worst_cpu.begin(), worst_cpu.end());
  std::printf("  largest error / bound: %.3f against the exact product, %.3f against the CPU\n", we, wc);
  EXPECT_LE(we, 1.0) << "an output is off the exact integer product by more than one fp16 rounding";
  EXPECT_LE(wc, 1.0) << "an output is off the CPU QuantLinear by more than fp16 rounding + fp32 summation";
}

TEST(LinearW8A8, QuantizerAndGemmMatchFormatAndCpu) {
  NIBBLE_REQUIRE_GPU();
  W8A8Gemm gemm(300);
  const Case cases[] = {
      {1, 256, 512, true, false, 1.0f},    {3, 96, 1024, false, true, 0.9f},  {17, 16, 64, true, true, 1.0f},
      {64, 1024, 2048, true, false, 1.0f}, {300, 520, 776, true, true, 0.8f},
      // Multiples of 4 but not of 8: run right or refused at load.
      {5, 12, 1028, true, true, 1.0f},     {33, 100, 772, false, false, 1.0f},
  };
  for (const Case& c : cases) run_case(gemm, c, testing::fresh_seed());
}

// Refusals happen before anything reaches the device, so they run without a GPU too.
void expect_refusal(const quant::QuantLinear& q, const std::string& says) {
  try {
    upload_w8a8(q, "model.layers.0.mlp.down_proj");
    ADD_FAILURE() << "accepted; expected a refusal saying '" << says << "'";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(says), std::string::npos) << what;
    EXPECT_NE(what.find("down_proj"), std::string::npos) << what;
  }
}

TEST(LinearW8A8, RefusesWhatCuBlasLtOrTheKernelsCannotRun) {
  const quant::LinearQuantSpec spec = w8a8_spec(1.0f);
  expect_refusal(*random_w8a8(1, 64, 30, false, false, spec), "30 (out x in)");  // K % 4
  expect_refusal(*random_w8a8(2, 18, 64, false, false, spec), "18 x 64");        // N % 4
  quant::LinearQuantSpec grouped = spec;
  grouped.weight.group = 32;
  expect_refusal(*random_w8a8(3, 64, 64, false, false, grouped), "one scale per output channel");
  quant::LinearQuantSpec int4_act = spec;
  int4_act.act->format = quant::Format::Int4Sym;
  expect_refusal(*random_w8a8(4, 64, 64, false, false, int4_act), "int4 activations");
  quant::LinearQuantSpec keepers = spec;
  keepers.keeper = 16;
  expect_refusal(*random_w8a8(5, 64, 64, false, false, keepers), "keeper");
}

}  // namespace
}  // namespace nibble::cuda
