// The FP16 linear (linear_fp16.h) against a float64 loop over the same fp16 values: the streaming
// path (1..4 rows, fp16 and fp32 output) and cuBLAS beyond it, at shapes with a tail of weight rows
// (N not a multiple of a block's 16 rows) and K not a multiple of the warp's 256-wide stride.
// Outputs are poisoned first, so a row left unwritten fails. Seeds are fresh on every run and printed.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "gpu_test_util.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/cuda/linear_fp16.h"
#include "nibble/core/half.h"

namespace nibble::cuda {
namespace {

std::vector<uint16_t> random_half(uint64_t seed, int64_t n, float range) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  testing::parallel_for(n, [&](int64_t i) { v[size_t(i)] = float_to_fp16(range * testing::uniform(seed, uint64_t(i))); });
  return v;
}

template <typename Out>
void check_case(LinearFp16& blas, int64_t M, int64_t N, int64_t K, uint64_t seed) {
  const std::vector<uint16_t> x = random_half(seed, M * K, 1.0f), w = random_half(seed + 1, N * K, 1.0f / std::sqrt(float(K)));
  DeviceArray<__half> dx(reinterpret_cast<const __half*>(x.data()), x.size()),
      dw(reinterpret_cast<const __half*>(w.data()), w.size());
  DeviceArray<Out> dy(size_t(M * N));
  NIBBLE_CUDA_CHECK(cudaMemset(dy.get(), 0xff, dy.size() * sizeof(Out)));  // NaN in fp16 and fp32
  blas.run(dx.get(), dw.get(), dy.get(), M, N, K, nullptr);
  std::vector<Out> y(dy.size());
  NIBBLE_CUDA_CHECK(cudaMemcpy(y.data(), dy.get(), y.size() * sizeof(Out), cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(fp16_to_float(x[size_t(m * K + k)])) * double(fp16_to_float(w[size_t(n * K + k)]));
        ref += p;
        mag += std::abs(p);
      }
      float got;
      if constexpr (sizeof(Out) == 2) got = fp16_to_float(reinterpret_cast<const uint16_t&>(y[size_t(m * N + n)]));
      else got = y[size_t(m * N + n)];
      // fp32 accumulation (K-term sums, well under 1e-5 of the magnitude) + the output's rounding;
      // cuBLAS (beyond the streaming rows) may round twice to fp16 (measured on the H200: 1.01x the
      // single-rounding bound once in 84 cases), so its rows get two roundings.
      const int roundings = M > LinearFp16::kGemvMaxRows ? 2 : 1;
      const double tol =
          1e-5 * mag + (sizeof(Out) == 2 ? roundings * std::ldexp(std::abs(ref), -11) + 1e-7 : 1e-7);
      ASSERT_TRUE(std::isfinite(got)) << "row " << m << " col " << n << " was not written";
      worst = std::max(worst, std::abs(double(got) - ref) / tol);
      ASSERT_LE(std::abs(double(got) - ref), tol) << "M " << M << " N " << N << " K " << K << " at (" << m << ", " << n << ")";
    }
  std::printf("M %lld N %lld K %lld %s out: worst error %.2f of the tolerance\n", (long long)M, (long long)N,
              (long long)K, sizeof(Out) == 2 ? "fp16" : "fp32", worst);
}

TEST(LinearFp16, StreamingRowsAndCublasMatchFloat64) {
  NIBBLE_REQUIRE_GPU();
  LinearFp16 blas;
  const uint64_t seed = testing::fresh_seed();
  std::printf("seed %llu\n", (unsigned long long)seed);
  for (int64_t M : {1, 2, 3, 4, 5, 17})
    for (auto [N, K] : {std::pair<int64_t, int64_t>{1, 8}, {37, 264}, {300, 4096}, {4096, 1032}}) {
      check_case<__half>(blas, M, N, K, seed + uint64_t(M * 7 + N + K));
      check_case<float>(blas, M, N, K, seed + uint64_t(M * 7 + N + K) + 1);
    }
}

}  // namespace
}  // namespace nibble::cuda
