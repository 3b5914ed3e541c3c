#include "nibble/quant/gptq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/core/interrupt.h"
#include "nibble/core/parallel.h"
#include "nibble/quant/device_math.h"

extern "C" {
// LAPACK (shipped inside OpenBLAS), Fortran calling convention, column-major.
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
}

namespace nibble::quant {

namespace {

// U with H⁻¹ = UᵀU (row-major, upper) by LAPACK.
std::vector<double> inverse_cholesky_upper(std::vector<double> H, int64_t K, const std::string& where) {
  // H is symmetric, so row-major and column-major views coincide: factor with LAPACK directly.
  const int n = int(K);
  int info = 0;
  dpotrf_("L", &n, H.data(), &n, &info);
  check(info == 0, where, "GPTQ: the damped Hessian is not positive definite (LAPACK dpotrf info {}); raise --percdamp",
        info);
  dpotri_("L", &n, H.data(), &n, &info);
  check(info == 0, where, "GPTQ: inverting the Hessian failed (LAPACK dpotri info {})", info);
  // dpotri filled the lower triangle (column-major) = the upper triangle in row-major; mirror it down.
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < i; ++j) H[size_t(i * K + j)] = H[size_t(j * K + i)];
  // Column-major "U" factor of H⁻¹ = Uᵀ U. In our row-major view the factor lands transposed.
  dpotrf_("U", &n, H.data(), &n, &info);
  check(info == 0, where, "GPTQ: Cholesky of the inverse Hessian failed (LAPACK dpotrf info {})", info);
  std::vector<double> U(size_t(K * K), 0.0);
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = i; j < K; ++j) U[size_t(i * K + j)] = H[size_t(i + j * K)];
  return U;
}

// GPTQ's step for column k of one row: the rounding error (w - q) / U_kk, spread over the row's
// columns (k, end) through U's row k. `row` holds the row's columns from row_k0 on. Returns the error.
double gptq_column_step(double w, double q, const std::vector<double>& U, int64_t K, int64_t k, double* row,
                        int64_t row_k0, int64_t end) {
  const double e = (w - q) / U[size_t(k * K + k)];
  for (int64_t j = k + 1; j < end; ++j) row[j - row_k0] -= e * U[size_t(k * K + j)];
  return e;
}

// GPTQ's treatment of H [K, K] before the factorisation, in place: channels that never fired
// carry no information, so they get a unit diagonal (and dead[k] = 1: their weights are zeroed);
// then percdamp · mean(diag H) is added to the diagonal.
void damp_hessian(std::vector<double>& H, int64_t K, double percdamp, std::vector<char>* dead) {
  dead->assign(H.size() / size_t(K), 0);
  double mean_diag = 0;
  for (int64_t i = 0; i < K; ++i) {
    if (H[size_t(i * K + i)] == 0) {
      (*dead)[size_t(i)] = 1;
      H[size_t(i * K + i)] = 1;
    }
    mean_diag += H[size_t(i * K + i)];
  }
  mean_diag /= double(K);
  for (int64_t i = 0; i < K; ++i) H[size_t(i * K + i)] += percdamp * mean_diag;
}

// The keeper columns' results as GptqResult holds them: codes and one scale per row, or fp16 bits.
void package_keepers(GptqResult& r, const LinearQuantSpec& spec, const std::optional<FormatSpec>& kspec,
                     std::vector<uint8_t> codes, const std::vector<float>& values, const std::vector<float>& scales) {
  if (spec.keeper == 0) return;
  if (!kspec) {
    for (float v : values) r.keeper_fp16.push_back(float_to_fp16(v));
    return;
  }
  QuantizedMatrix km;
  km.spec = *kspec;
  km.rows = int64_t(scales.size());
  km.cols = spec.keeper;
  km.codes = std::move(codes);
  if (scale_bytes(kspec->format) > 0) km.scales = scales;
  r.keepers = std::move(km);
}

}  // namespace

std::vector<double> gptq_inverse_hessian_factor(std::vector<double> H, int64_t K, double percdamp,
                                                std::vector<char>* dead, const std::string& where, bool on_device) {
  damp_hessian(H, K, percdamp, dead);
  return on_device ? device_inverse_cholesky_upper(std::move(H), K, where) : inverse_cholesky_upper(std::move(H), K, where);
}

GptqResult gptq_quantize(const std::vector<float>& Wf, int64_t N, int64_t K, std::vector<double> xtx,
                         const LinearQuantSpec& spec, const GptqOptions& opt, const std::string& where) {
  check(int64_t(xtx.size()) == K * K, where, "GPTQ: Hessian is {} values for K = {}", xtx.size(), K);
  const int64_t M = K - spec.keeper;
  const FormatSpec& wspec = spec.weight;
  check(wspec.group == 0 || M % wspec.group == 0, where, "GPTQ: group {} does not divide {} channels", wspec.group, M);
  check(N % wspec.row_group == 0, where, "GPTQ: row group {} does not divide {} rows", wspec.row_group, N);
  const int64_t group = wspec.group == 0 ? M : wspec.group;
  const std::optional<FormatSpec> kspec = keeper_spec(spec.keeper_precision);

  std::vector<char> dead;
  // diag(H): how much each input channel's rounding error costs at the output.
  std::vector<double> hdiag(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) hdiag[size_t(k)] = xtx[size_t(k * K + k)];
  damp_hessian(xtx, K, opt.percdamp, &dead);

  GptqResult r;
  r.main.spec = wspec;
  r.main.rows = N;
  r.main.cols = M;
  r.main.codes.assign(size_t(N * M), 0);
  const bool has_scales = scale_bytes(wspec.format) > 0;
  if (has_scales) r.main.scales.assign(size_t(N / wspec.row_group * (M / group)), 0.0f);
  if (format_is_asymmetric(wspec.format)) r.main.zeros.assign(r.main.scales.size(), 0);
  std::vector<float> keeper_values(size_t(N * spec.keeper));
  std::vector<uint8_t> keeper_codes(size_t(N * spec.keeper));
  std::vector<float> keeper_scales(static_cast<size_t>(N));

  // A block never straddles a group start or the keeper boundary: a group's scale is then chosen
  // after every earlier column's error has reached it, exactly as without lazy batches.
  auto block_end = [&](int64_t i1) {
    int64_t end = std::min(K, i1 + opt.block);
    if (i1 < M) end = std::min({end, M, (i1 / group + 1) * group});
    return end;
  };
  if (opt.on_device) {
    check(!opt.clip_by_gptq_loss, where, "GPTQ on the device: no clip search by GPTQ loss there");
    const std::unique_ptr<DeviceGptq> device =
        make_device_gptq(Wf, N, K, std::move(xtx), dead, hdiag, spec, opt.clip_search, where);
    for (int64_t i1 = 0, i2; i1 < K; i1 = i2) {
      i2 = block_end(i1);
      throw_if_interrupted(where);
      device->run_block(i1, i2);
    }
    device->finish(r, keeper_codes, keeper_values, keeper_scales);
    package_keepers(r, spec, kspec, std::move(keeper_codes), keeper_values, keeper_scales);
    return r;
  }
  const std::vector<double> U = inverse_cholesky_upper(std::move(xtx), K, where);
  std::vector<double> W(Wf.begin(), Wf.end());
  for (int64_t k = 0; k < K; ++k)
    if (dead[size_t(k)])
      for (int64_t n = 0; n < N; ++n) W[size_t(n * K + k)] = 0;

  // The trial's error: diag(H) times the rounding error of the group's current weights, or GPTQ's
  // loss of the group (clip_by_gptq_loss): its columns quantized in turn by the column loop's own
  // step, each error spread over the group's later columns.
  auto trial_error = [&](const FormatSpec& fs, const GroupScale& g, int64_t n0, int row_group, int64_t k0,
                         int64_t width, std::vector<double>& row) {
    auto round_trip = [&](double w) { return decode_element(fs.format, encode_element(fs.format, float(w), g), g); };
    double err = 0;
    for (int64_t n = n0; n < n0 + row_group; ++n) {
      if (opt.clip_by_gptq_loss) {
        row.assign(W.begin() + n * K + k0, W.begin() + n * K + k0 + width);
        for (int64_t i = 0; i < width; ++i) {
          const double e = gptq_column_step(row[size_t(i)], round_trip(row[size_t(i)]), U, K, k0 + i, row.data(),
                                            k0, k0 + width);
          err += e * e;
        }
      } else {
        for (int64_t k = k0; k < k0 + width; ++k) {
          const float w = float(W[size_t(n * K + k)]);
          const double d = w - round_trip(w);
          err += hdiag[size_t(k)] * d * d;
        }
      }
    }
    return err;
  };
  auto best_clip_scale = [&](const FormatSpec& fs, const GroupStats& stats, int64_t n0, int row_group, int64_t k0,
                             int64_t width) {
    GroupScale best{};
    double best_err = -1;
    std::vector<double> row;
    for (int step = 0; step <= 10; ++step) {
      FormatSpec trial = fs;
      trial.clip = 1.0f - 0.05f * float(step);
      const GroupScale g = choose_scale(trial, stats);
      const double err = trial_error(fs, g, n0, row_group, k0, width, row);
      if (best_err < 0 || err < best_err) {
        best_err = err;
        best = g;
      }
    }
    return best;
  };

  // The scale a column's element uses, set when the column loop enters its group (rows [r0, r1)).
  std::vector<GroupScale> row_scale(static_cast<size_t>(N));
  auto enter_group = [&](int64_t k0, int64_t width, const FormatSpec& fs, int row_group, bool keeper, int64_t r0,
                         int64_t r1) {
    for (int64_t n0 = r0; n0 < r1; n0 += row_group) {
      GroupStats stats;
      for (int64_t n = n0; n < n0 + row_group; ++n)
        for (int64_t k = k0; k < k0 + width; ++k) stats.add(float(W[size_t(n * K + k)]));
      GroupScale g = choose_scale(fs, stats);
      if (opt.clip_search && !keeper) g = best_clip_scale(fs, stats, n0, row_group, k0, width);
      for (int64_t n = n0; n < n0 + row_group; ++n) row_scale[size_t(n)] = g;
      if (keeper) {
        for (int64_t n = n0; n < n0 + row_group; ++n) keeper_scales[size_t(n)] = g.scale;
      } else if (has_scales) {
        const size_t idx = size_t(n0 / row_group * (M / group) + k0 / group);
        r.main.scales[idx] = g.scale;
        if (!r.main.zeros.empty()) r.main.zeros[idx] = g.zero;
      }
    }
  };
  // Quantizes one element of column k with the current group scale; returns the stored value.
  auto quantize = [&](int64_t n, int64_t k, double w) -> double {
    const GroupScale& g = row_scale[size_t(n)];
    if (k < M) {
      const uint8_t code = encode_element(wspec.format, float(w), g);
      r.main.codes[size_t(n * M + k)] = code;
      return decode_element(wspec.format, code, g);
    }
    const int64_t kk = k - M;
    if (!kspec) return keeper_values[size_t(n * spec.keeper + kk)] = round_fp16(float(w));
    const uint8_t code = encode_element(kspec->format, float(w), g);
    keeper_codes[size_t(n * spec.keeper + kk)] = code;
    return keeper_values[size_t(n * spec.keeper + kk)] = decode_element(kspec->format, code, g);
  };

  std::vector<double> err;
  // Within a block the rows are independent (each has its own scales, codes, error row and W row):
  // chunks of whole row groups run in parallel. The chunks are fixed, not one per thread, so the
  // loss sums in the same order at any thread count, and every value is computed as serially.
  const int64_t chunk_rows = wspec.row_group * std::max<int64_t>(1, 64 / wspec.row_group);
  const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
  std::vector<double> chunk_loss(static_cast<size_t>(chunks));
  for (int64_t i1 = 0, i2; i1 < K; i1 = i2) {
    i2 = block_end(i1);
    throw_if_interrupted(where);  // a 7B down_proj takes minutes on a CPU
    const int64_t count = i2 - i1;
    err.assign(size_t(N * count), 0.0);
    std::fill(chunk_loss.begin(), chunk_loss.end(), 0.0);
    parallel_for(chunks, [&](int64_t ch) {
      const int64_t r0 = ch * chunk_rows, r1 = std::min(N, r0 + chunk_rows);
      for (int64_t i = i1; i < i2; ++i) {
        if (i < M && i % group == 0) enter_group(i, group, wspec, wspec.row_group, false, r0, r1);
        if (i == M && kspec) enter_group(M, spec.keeper, *kspec, 1, true, r0, r1);
        const double d = U[size_t(i * K + i)];
        for (int64_t n = r0; n < r1; ++n) {
          const double w = W[size_t(n * K + i)];
          // The error is spread over the rest of this block now; later blocks get it in one product.
          const double q = quantize(n, i, w);
          const double e = gptq_column_step(w, q, U, K, i, W.data() + n * K, 0, i2);
          chunk_loss[size_t(ch)] += (w - q) * (w - q) / (d * d);
          err[size_t(n * count + (i - i1))] = e;
        }
      }
    });
    for (double l : chunk_loss) r.loss += l;
    if (i2 < K)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), int(K - i2), int(count), -1.0, err.data(),
                  int(count), U.data() + i1 * K + i2, int(K), 1.0, W.data() + i2, int(K));
  }
  package_keepers(r, spec, kspec, std::move(keeper_codes), keeper_values, keeper_scales);
  return r;
}

}  // namespace nibble::quant
