// norm_quantize (rmsnorm / gather / swiglu variants) against quant/format.h: the CPU computes the
// fp32 values the simulated model computes (backend/cpu/ops.cpp's formulas), quantizes them with
// format.h's scale and code rules, and the device's codes and scales must match. A code (or scale) may
// differ by one (fp16 ulp) only where x / scale (clip · absmax / qmax) sits within kTieTolerance of a
// rounding tie (the two sides' fp32 values differ in the last bits: summation order, exp); those are
// counted and reported. Seeds are fresh on every run and printed.
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include "gpu_test_util.h"
#include "nibble/backend/cuda/atom_layout.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/cuda/format_device.cuh"
#include "nibble/backend/cuda/gemm_w4a4.h"
#include "nibble/backend/cuda/model_kernels.h"
#include "nibble/backend/cuda/norm_quantize.h"
#include "nibble/core/half.h"
#include "nibble/quant/format.h"

namespace nibble::cuda {
namespace {

using testing::uniform;

enum class Variant { Norm, Gather, Swiglu };

struct Counts {
  int64_t codes = 0, boundary_codes = 0, bad_codes = 0;
  int64_t scales = 0, boundary_scales = 0, bad_scales = 0, bad_padding = 0;
};

// Compares one group of codes: expected from x with the device's scale (format.h), the device's
// scale against format.h's scale from the reference values.
// The device's fp32 values differ from the reference's in the last bits: a tree sum of K ≤ 14336
// squares (log2 K ≤ 14 roundings), rsqrt and two products, or exp: relative error ≲ 20 · 2^-24 ≈ 1.2e-6.
// A rounding tie counts as one only within 1e-5 (8x that) of it.
constexpr double kTieTolerance = 1e-5;

void compare_group(const float* x, int n, int bits, float clip, float ref_scale, float gpu_scale,
                   const int8_t* gpu_codes, Counts& c) {
  ++c.scales;
  if (gpu_scale != ref_scale) {
    // A boundary case: the two scales one fp16 ulp apart, and the unrounded scale clip · absmax / qmax
    // (format.h) within the tolerance of their midpoint, the tie that rounds either way.
    const int d = std::abs(int(float_to_fp16(gpu_scale)) - int(float_to_fp16(ref_scale)));
    float absmax = 0;
    for (int i = 0; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));
    const double raw = double(clip) * absmax / double((1 << (bits - 1)) - 1);
    const double mid = (double(gpu_scale) + double(ref_scale)) / 2;
    if (d == 1 && std::fabs(raw - mid) <= kTieTolerance * raw) ++c.boundary_scales;
    else ++c.bad_scales;
  }
  for (int i = 0; i < n; ++i) {
    ++c.codes;
    const int8_t want = int8_t(quant::int_sym_encode(x[i], gpu_scale, bits));
    if (want == gpu_codes[i]) continue;
    const float q = gpu_scale == 0 ? 0 : x[i] / gpu_scale;
    const float frac = std::fabs(q - std::floor(q) - 0.5f);
    // The values' relative difference moves x / scale by at most |x / scale| · kTieTolerance.
    if (std::abs(int(want) - int(gpu_codes[i])) == 1 && frac <= std::fabs(q) * kTieTolerance) ++c.boundary_codes;
    else ++c.bad_codes;
  }
}

// A case's inputs: fp16 activations with a few outlier channels (a; u for swiglu), a permutation
// and a norm weight, on the host and the device. permuted = false: the identity order, passed as
// a null permutation (the kernels' direct path).
struct Inputs {
  Variant v;
  int64_t M, ld;
  int K;
  bool permuted;
  std::vector<uint16_t> a, u;
  std::vector<int32_t> perm;
  std::vector<float> w;
  DeviceArray<__half> da, du;
  DeviceArray<int32_t> dperm;
  DeviceArray<float> dw;

  // specials: rows with the values whose codes take the rare paths (K >= 1024): a zero row, zero
  // groups (source order) alone or with one NaN (a zero scale: every code 0, the NaN's too), ±inf,
  // fp16 subnormals and 65504 (the smallest and largest scales).
  Inputs(Variant variant, int64_t rows, int k, bool perm_on, uint64_t seed, bool specials = false)
      : v(variant), M(rows), ld(k + (variant == Variant::Swiglu ? 0 : 64)), K(k), permuted(perm_on) {
    a.resize(size_t(M * ld));  // a row stride wider than K, once
    u.resize(size_t(M * ld));
    for (int64_t i = 0; i < M * ld; ++i) {
      const int64_t ch = i % ld;
      const float scale = (ch % 97 == 3) ? 20.0f : 2.0f;
      a[size_t(i)] = float_to_fp16(scale * uniform(seed, uint64_t(i)));
      u[size_t(i)] = float_to_fp16(2.0f * uniform(seed + 1, uint64_t(i)));
    }
    for (int64_t m = 0; specials && m < M; ++m) {
      uint16_t* r = &a[size_t(m * ld)];
      if (m % 7 == 6) std::fill(r, r + K, uint16_t(0));
      if (m % 3 == 1) std::fill(r + 256, r + 384, uint16_t(0));
      if (m % 6 == 1) r[256 + 5] = 0x7e00;  // NaN
      if (m % 3 == 2) r[512 + 7] = 0x7c00, r[512 + 9] = 0xfc00;  // +inf, -inf
      if (m % 4 == 3)
        for (int c = 768; c < 896; ++c) r[c] = uint16_t(1 + c % 5) | (c % 2 ? 0x8000 : 0);  // subnormals
      if (m % 5 == 0)
        for (int c = 896; c < 1024; ++c) r[c] = c % 3 ? 0x7bff : 0xfbff;  // ±65504
    }
    perm.resize(size_t(K));
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937_64 rng(seed);
    if (permuted) std::shuffle(perm.begin(), perm.end(), rng);
    w.resize(size_t(K));
    for (int j = 0; j < K; ++j) w[size_t(j)] = 1.0f + 0.5f * uniform(seed + 2, uint64_t(j));
    da = DeviceArray<__half>(reinterpret_cast<const __half*>(a.data()), a.size());
    du = DeviceArray<__half>(reinterpret_cast<const __half*>(u.data()), u.size());
    dperm = DeviceArray<int32_t>(perm.data(), perm.size());
    dw = DeviceArray<float>(w.data(), w.size());
  }

  // The variant's quantizer on the device into `out`.
  void quantize(const ActOutput& out, ActQuant q) const {
    const int32_t* p = permuted ? dperm.get() : nullptr;
    switch (v) {
      case Variant::Norm: rmsnorm_quantize(da.get(), ld, p, dw.get(), 1e-5f, out, q, nullptr); break;
      case Variant::Gather: gather_quantize(da.get(), ld, p, out, q, nullptr); break;
      case Variant::Swiglu: swiglu_quantize(da.get(), du.get(), ld, p, out, q, nullptr); break;
    }
  }
};

Counts run_case(Variant v, int64_t M, int K, int keeper, bool permuted, uint64_t seed, bool specials = false) {
  const Inputs in(v, M, K, permuted, seed, specials);
  const std::vector<uint16_t>& a = in.a;
  const std::vector<uint16_t>& u = in.u;
  const std::vector<int32_t>& perm = in.perm;
  const std::vector<float>& w = in.w;
  const int64_t ld = in.ld;

  // Reference values, channel j of the permuted order.
  std::vector<float> x(size_t(M * K));
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* ar = &a[size_t(m * ld)];
    const uint16_t* ur = &u[size_t(m * ld)];
    float inv = 1;
    if (v == Variant::Norm) {
      double ss = 0;
      for (int k = 0; k < K; ++k) ss += double(fp16_to_float(ar[k])) * fp16_to_float(ar[k]);
      const float ms = float(ss) / float(K);
      inv = 1.0f / std::sqrt(ms + 1e-5f);
    }
    for (int j = 0; j < K; ++j) {
      const int src = perm[size_t(j)];
      float val = fp16_to_float(ar[src]);
      if (v == Variant::Norm) val = w[size_t(j)] * (val * inv);
      if (v == Variant::Swiglu) val = val / (1.0f + std::exp(-val)) * fp16_to_float(ur[src]);
      x[size_t(m * K + j)] = val;
    }
  }
  const ActQuant aq{0.9f, 1.0f};
  // The reference scales straight from format.h (atom_quantize_host refuses the special rows' NaN
  // and inf, which format.h's scale and code rules define: NaN is no group's maximum, inf clamps).
  const AtomShape sh = atom_shape(M, K, keeper);
  const auto format_scale = [](quant::Format f, int n, float clip, const float* v) {
    quant::GroupStats st;
    st.add(v, n);
    return quant::choose_scale({f, n, 1, clip}, st).scale;
  };

  // Device run, output poisoned.
  AtomDeviceMatrix out(atom_shape(M, K, keeper));
  NIBBLE_CUDA_CHECK(cudaMemset(out.mut().q, 0xab, size_t(out.shape().code_bytes())));
  NIBBLE_CUDA_CHECK(cudaMemset(out.mut().s, 0xff, size_t(out.shape().scale_count()) * 2));
  in.quantize(out.mut(), aq);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  const AtomGpuHost got_gpu = out.download();
  const AtomPackedHost got = from_gpu_layout(got_gpu);

  Counts c;
  const int k4 = K - keeper;
  for (int64_t m = 0; m < M; ++m) {
    std::vector<uint8_t> codes(size_t(std::max(k4, 2)));
    if (k4) quant::unpack_4bit(quant::Format::Int4Sym, &got.q4[size_t(m * k4 / 2)], k4, codes.data(), "test");
    for (int g = 0; g < sh.g4; ++g) {
      compare_group(&x[size_t(m * K + g * 128)], 128, 4, aq.clip4,
                    format_scale(quant::Format::Int4Sym, 128, aq.clip4, &x[size_t(m * K + g * 128)]),
                    fp16_to_float(got.s4[size_t(m * sh.g4 + g)]), reinterpret_cast<const int8_t*>(&codes[size_t(g * 128)]),
                    c);
    }
    if (keeper) {
      compare_group(&x[size_t(m * K + k4)], keeper, 8, aq.clip8,
                    format_scale(quant::Format::Int8Sym, keeper, aq.clip8, &x[size_t(m * K + k4)]),
                    fp16_to_float(got.s8[size_t(m)]), &got.q8[size_t(m * keeper)], c);
      for (int cg = 1; cg < sh.g8; ++cg)  // the keeper scale is repeated per keeper group
        if (got_gpu.s[size_t((sh.g4 + cg) * sh.rows_pad + m)] != got.s8[size_t(m)]) ++c.bad_scales;
    }
  }
  // Padding rows: zero codes and zero scales.
  for (int64_t row = M; row < sh.rows_pad; ++row) {
    for (int s = 0; s < sh.slabs(); ++s)
      for (int b = 0; b < 64; ++b)
        c.bad_padding += got_gpu.q[size_t(((row / 8) * sh.slabs() + s) * 512 + (row % 8) * 64 + b)] != 0;
    for (int g = 0; g < sh.groups(); ++g) c.bad_padding += got_gpu.s[size_t(g * sh.rows_pad + row)] != 0;
  }
  return c;
}

TEST(NormQuantize, MatchesFormat) {
  NIBBLE_REQUIRE_GPU();
  Counts total;
  for (Variant v : {Variant::Norm, Variant::Gather, Variant::Swiglu}) {
    for (int K : {512, 4096, 11008, 14336}) {
      for (int keeper : {0, 128, 256}) {
        for (int64_t M : {1, 7, 64, 300, 2100}) {
          for (bool permuted : {true, false}) {
            if (keeper == 256 && K != 4096) continue;
            if (M == 2100 && K != 4096) continue;  // a grid of > 8 blocks an SM: the register-capped kernel
            if (!permuted && (M == 7 || K == 14336)) continue;  // the direct path on fewer shapes
            const uint64_t seed = testing::fresh_seed();
            const Counts c = run_case(v, M, K, keeper, permuted, seed);
            const char* name = v == Variant::Norm ? "rmsnorm" : v == Variant::Gather ? "gather" : "swiglu";
            SCOPED_TRACE(::testing::Message() << "seed " << seed << (permuted ? " permuted" : " identity order"));
            EXPECT_EQ(c.bad_codes, 0) << name << " M=" << M << " K=" << K << " keeper=" << keeper;
            EXPECT_EQ(c.bad_scales, 0) << name << " M=" << M << " K=" << K << " keeper=" << keeper;
            EXPECT_EQ(c.bad_padding, 0) << name << " M=" << M << " K=" << K << " keeper=" << keeper;
            // Boundary cases must stay rare.
            EXPECT_LE(c.boundary_codes, c.codes / 1000 + 2) << name << " M=" << M << " K=" << K;
            EXPECT_LE(c.boundary_scales, c.scales / 100 + 2) << name << " M=" << M << " K=" << K;
            total.codes += c.codes;
            total.boundary_codes += c.boundary_codes;
            total.scales += c.scales;
            total.boundary_scales += c.boundary_scales;
            total.bad_codes += c.bad_codes;
            total.bad_scales += c.bad_scales;
          }
        }
      }
    }
  }
  std::printf("norm_quantize: %lld codes (%lld differ by one on a rounding boundary, %lld wrong), "
              "%lld scales (%lld one fp16 ulp apart on a boundary, %lld wrong)\n",
              (long long)total.codes, (long long)total.boundary_codes, (long long)total.bad_codes,
              (long long)total.scales, (long long)total.boundary_scales, (long long)total.bad_scales);
}

TEST(NormQuantize, SpecialValuesMatchFormat) {
  // Zero groups with and without a NaN, ±inf, fp16 subnormals and ±65504 (Inputs' specials): the
  // zero scale's codes, the clamps and the extreme scales, against format.h with no tolerance
  // needed beyond the usual rounding boundaries.
  NIBBLE_REQUIRE_GPU();
  for (Variant v : {Variant::Norm, Variant::Gather, Variant::Swiglu})
    for (int64_t M : {64, 2100})
      for (bool permuted : {true, false}) {
        const uint64_t seed = testing::fresh_seed();
        const Counts c = run_case(v, M, 4096, 128, permuted, seed, true);
        SCOPED_TRACE(::testing::Message() << "variant " << int(v) << " M " << M << " seed " << seed
                                          << (permuted ? " permuted" : " identity order"));
        EXPECT_EQ(c.bad_codes, 0);
        EXPECT_EQ(c.bad_scales, 0);
        EXPECT_EQ(c.bad_padding, 0);
        EXPECT_LE(c.boundary_codes, c.codes / 1000 + 2);
      }
}

// div_by_qmax and rcp_fp16_scale (format_device.cuh) against the IEEE operations they replace, on
// every input they can get: the fp16 scale of x / qmax for all 2^32 floats x and qmax 7 and 127
// (the quotient itself too, which differs only for x = -0: +0), and 1 / s for every nonzero finite
// fp16 value s.
__global__ void scale_math_mismatches(unsigned long long* out) {
  unsigned long long quotients = 0, scales = 0, rcps = 0;
  const uint64_t n = uint64_t(1) << 32, step = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t u = blockIdx.x * blockDim.x + threadIdx.x; u < n; u += step) {
    const float x = __uint_as_float(uint32_t(u));
    for (int i = 0; i < 2; ++i) {
      const float q = i == 0 ? 7.0f : 127.0f;
      const float want = x / q, got = div_by_qmax(x, q, q == 7.0f ? 1.0f / 7.0f : 1.0f / 127.0f);
      const bool same = __float_as_uint(want) == __float_as_uint(got) || (isnan(want) && isnan(got));
      quotients += !same && !(x == 0 && got == 0);
      const float ws = fp16_scale_device(want), gs = int_sym_scale_device(1.0f, x, q, q == 7.0f ? 1.0f / 7.0f : 1.0f / 127.0f);
      scales += __float_as_uint(ws) != __float_as_uint(gs) && !(isnan(ws) && isnan(gs));
    }
    if (u < 65536) {
      const float sc = __half2float(__ushort_as_half(uint16_t(u)));
      if (sc != 0 && isfinite(sc)) rcps += __float_as_uint(rcp_fp16_scale(sc)) != __float_as_uint(__frcp_rn(sc));
    }
  }
  atomicAdd(&out[0], quotients);
  atomicAdd(&out[1], scales);
  atomicAdd(&out[2], rcps);
}

TEST(NormQuantize, ScaleMathEqualsIeee) {
  NIBBLE_REQUIRE_GPU();
  DeviceArray<unsigned long long> d(3);
  NIBBLE_CUDA_CHECK(cudaMemset(d.get(), 0, 3 * sizeof(unsigned long long)));
  scale_math_mismatches<<<1024, 256>>>(d.get());
  NIBBLE_CUDA_CHECK(cudaGetLastError());
  unsigned long long h[3];
  NIBBLE_CUDA_CHECK(cudaMemcpy(h, d.get(), sizeof(h), cudaMemcpyDeviceToHost));
  EXPECT_EQ(h[0], 0u) << "quotients x / qmax that differ";
  EXPECT_EQ(h[1], 0u) << "fp16 scales that differ";
  EXPECT_EQ(h[2], 0u) << "reciprocals 1 / s that differ";
  std::printf("scale math: 2 x 2^32 quotients and scales, 63,486 reciprocals: %llu / %llu / %llu differ\n", h[0], h[1], h[2]);
}

TEST(NormQuantize, ResidualFusedEqualsTwoKernels) {
  // residual_rmsnorm_quantize against what it replaces in the executor, residual_rmsnorm (h += y,
  // h16 = fp16(h)) then rmsnorm_quantize(h16): every byte of the output (packed and pre-widened,
  // poisoned differently) and of the fp32 residual written back, run twice on fresh copies of h; the
  // row counters left zero. M from 1 (every row split over many blocks: the last block writes h back)
  // to 2100 (one block a row writes its own); y null adds nothing and leaves h as it was.
  NIBBLE_REQUIRE_GPU();
  int cases = 0;
  for (int K : {512, 4096, 8192}) {
    for (int keeper : {0, 128}) {
      for (int64_t M : {1, 7, 16, 100, 300, 2100}) {
        for (bool permuted : {true, false}) {
          for (bool add : {true, false}) {
            if (M == 2100 && K == 8192) continue;
            const bool hadamard = (M + keeper / 128 + permuted) % 2 == 1;
            const uint64_t seed = testing::fresh_seed();
            SCOPED_TRACE(::testing::Message() << "M=" << M << " K=" << K << " keeper=" << keeper << " seed " << seed
                                              << (permuted ? " permuted" : " identity") << (hadamard ? " hadamard" : "")
                                              << (add ? " h + y" : " y null"));
            const Inputs in(Variant::Norm, M, K, permuted, seed);  // its perm and norm weight
            std::vector<float> h(size_t(M * K));
            std::vector<uint16_t> y(size_t(M * K));
            for (int64_t i = 0; i < M * K; ++i) {
              const bool outlier = (i % K) % 97 == 3;
              h[size_t(i)] = (outlier ? 30.0f : 3.0f) * uniform(seed + 3, uint64_t(i));
              y[size_t(i)] = float_to_fp16(2.0f * uniform(seed + 4, uint64_t(i)));
            }
            for (int64_t m = 6; m < M; m += 7) std::fill(&h[size_t(m * K)], &h[size_t(m * K + K)], 0.0f);  // zero rows
            const DeviceArray<__half> dy(reinterpret_cast<const __half*>(y.data()), y.size());
            const __half* y_or_null = add ? dy.get() : nullptr;
            const int32_t* perm = permuted ? in.dperm.get() : nullptr;
            ActQuant aq{0.9f, 1.0f};
            aq.hadamard = hadamard;
            const AtomShape shape = atom_shape(M, K, keeper);
            const size_t q_bytes = size_t(shape.code_bytes()), s_bytes = size_t(shape.scale_count()) * 2;
            const size_t b_bytes = gemm_w4a4_x_int8_bytes(M, K, keeper);
            DeviceArray<int> counters{size_t(M)};
            NIBBLE_CUDA_CHECK(cudaMemset(counters.get(), 0, size_t(M) * sizeof(int)));
            // run 0: the two kernels; runs 1, 2: the fused one. Each: the packed output, then the
            // pre-widened one, each from a fresh copy of h; the second copy of h kept for comparison.
            std::vector<std::vector<uint8_t>> got(3);
            for (int run = 0; run < 3; ++run) {
              got[size_t(run)].resize(q_bytes + s_bytes + b_bytes + 2 * h.size() * 4);
              uint8_t* at = got[size_t(run)].data();
              AtomDeviceMatrix packed(shape);
              NIBBLE_CUDA_CHECK(cudaMemset(packed.mut().q, 0x11 * (run + 1), q_bytes));
              NIBBLE_CUDA_CHECK(cudaMemset(packed.mut().s, 0x23 * (run + 1), s_bytes));
              DeviceArray<uint8_t> widened(b_bytes);
              NIBBLE_CUDA_CHECK(cudaMemset(widened.get(), 0x37 * (run + 1), b_bytes));
              for (int layout = 0; layout < 2; ++layout) {
                const ActOutput out = layout == 0 ? ActOutput(packed.mut()) : ActOutput::pre_widened(widened.get(), shape);
                DeviceArray<float> dh(h.data(), h.size());
                if (run == 0) {
                  DeviceArray<__half> h16(h.size());
                  residual_rmsnorm(dh.get(), y_or_null, M, K, nullptr, 1e-5f, nullptr, h16.get(), nullptr);
                  rmsnorm_quantize(h16.get(), K, perm, in.dw.get(), 1e-5f, out, aq, nullptr);
                  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
                } else {
                  residual_rmsnorm_quantize(dh.get(), y_or_null, perm, in.dw.get(), 1e-5f, out, aq, counters.get(), nullptr);
                }
                NIBBLE_CUDA_CHECK(cudaMemcpy(at + q_bytes + s_bytes + b_bytes + layout * h.size() * 4, dh.get(),
                                             h.size() * 4, cudaMemcpyDeviceToHost));
              }
              NIBBLE_CUDA_CHECK(cudaMemcpy(at, packed.mut().q, q_bytes, cudaMemcpyDeviceToHost));
              NIBBLE_CUDA_CHECK(cudaMemcpy(at + q_bytes, packed.mut().s, s_bytes, cudaMemcpyDeviceToHost));
              NIBBLE_CUDA_CHECK(cudaMemcpy(at + q_bytes + s_bytes, widened.get(), b_bytes, cudaMemcpyDeviceToHost));
            }
            int64_t differ = 0, differ_again = 0;
            for (size_t i = 0; i < got[0].size(); ++i) {
              differ += got[0][i] != got[1][i];
              differ_again += got[1][i] != got[2][i];
            }
            EXPECT_EQ(differ, 0);
            EXPECT_EQ(differ_again, 0);
            // h itself: h + y where y was given (the write-back happened), else untouched.
            const float* h_after = reinterpret_cast<const float*>(got[1].data() + q_bytes + s_bytes + b_bytes);
            int64_t bad_h = 0;
            for (size_t i = 0; i < h.size(); ++i) {
              const float want = add ? h[i] + fp16_to_float(y[i]) : h[i];
              bad_h += std::memcmp(&h_after[i], &want, 4) != 0;
            }
            EXPECT_EQ(bad_h, 0);
            std::vector<int> left(static_cast<size_t>(M), -1);
            NIBBLE_CUDA_CHECK(cudaMemcpy(left.data(), counters.get(), left.size() * sizeof(int), cudaMemcpyDeviceToHost));
            EXPECT_EQ(std::count(left.begin(), left.end(), 0), M) << "row counters not left at zero";
            ++cases;
          }
        }
      }
    }
  }
  std::printf("residual_rmsnorm_quantize vs residual_rmsnorm + rmsnorm_quantize: %d cases compared byte for byte\n", cases);
}

TEST(NormQuantize, PreWidenedEqualsRepackOfPacked) {
  // The quantizers writing X pre-widened (the wgmma path's input) must write exactly the bytes
  // x_to_int8_b_layout makes of their packed output: every byte of the blocks (codes, fp32 scales,
  // the tokens past M up to the 128-token tile, a keeper slab's unused half), both buffers poisoned
  // differently; every variant, with and without a permutation and the Hadamard rotation, M not a
  // multiple of the tile, and M = 2100 (the register-capped kernels).
  NIBBLE_REQUIRE_GPU();
  int cases = 0;
  for (Variant v : {Variant::Norm, Variant::Gather, Variant::Swiglu}) {
    for (int K : {512, 4096, 11008}) {
      for (int keeper : {0, 128, 256}) {
        for (int64_t M : {7, 65, 100, 300, 2100}) {
          for (bool permuted : {true, false}) {
            if (keeper == 256 && K != 4096) continue;
            if (M == 2100 && K != 4096) continue;
            const bool hadamard = (M + keeper / 128) % 2 == 1;  // half the cases rotated
            const uint64_t seed = testing::fresh_seed();
            const char* name = v == Variant::Norm ? "rmsnorm" : v == Variant::Gather ? "gather" : "swiglu";
            SCOPED_TRACE(::testing::Message() << name << " M=" << M << " K=" << K << " keeper=" << keeper << " seed "
                                              << seed << (permuted ? " permuted" : " identity order")
                                              << (hadamard ? " hadamard" : ""));
            const Inputs in(v, M, K, permuted, seed);
            ActQuant aq{0.9f, 1.0f};
            aq.hadamard = hadamard;
            const AtomShape shape = atom_shape(M, K, keeper);
            AtomDeviceMatrix packed(shape);
            in.quantize(packed.mut(), aq);
            const size_t bytes = gemm_w4a4_x_int8_bytes(M, K, keeper);
            DeviceArray<uint8_t> repacked(bytes), direct(bytes);
            NIBBLE_CUDA_CHECK(cudaMemset(repacked.get(), 0xa5, bytes));
            NIBBLE_CUDA_CHECK(cudaMemset(direct.get(), 0x5a, bytes));
            x_to_int8_b_layout(packed.view(), repacked.get(), nullptr);
            in.quantize(ActOutput::pre_widened(direct.get(), shape), aq);
            NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
            std::vector<uint8_t> want(bytes), got(bytes);
            NIBBLE_CUDA_CHECK(cudaMemcpy(want.data(), repacked.get(), bytes, cudaMemcpyDeviceToHost));
            NIBBLE_CUDA_CHECK(cudaMemcpy(got.data(), direct.get(), bytes, cudaMemcpyDeviceToHost));
            int64_t differ = 0;
            for (size_t i = 0; i < bytes; ++i) differ += got[i] != want[i];
            EXPECT_EQ(differ, 0);
            ++cases;
          }
        }
      }
    }
  }
  std::printf("norm_quantize pre-widened vs x_to_int8_b_layout of packed: %d cases compared byte for byte\n", cases);
}

}  // namespace
}  // namespace nibble::cuda
