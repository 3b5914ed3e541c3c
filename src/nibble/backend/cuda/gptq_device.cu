// quant/device_math.h's GPTQ on a CUDA device: the factor of H⁻¹ (cuSOLVER), the column loop of
// each lazy batch (one warp per row group of W) and the batch's update of the later columns (cuBLAS
// DGEMM). This file is compiled with --fmad=false, as gptq.cpp is with -ffp-contract=off
// (CMakeLists.txt): every operation of the column loop is rounded as written on both, so the
// device computes the host loop's values. The element and scale arithmetic is format.h's own
// (constexpr, called here as it is).
#include <cusolverDn.h>

#include <algorithm>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/quant/device_math.h"
#include "nibble/quant/format.h"

namespace nibble::quant {

namespace {

using cuda::CublasHandle;
using cuda::DeviceArray;
using cuda::require;

void check_cusolver(cusolverStatus_t s, const char* what, const std::string& where) {
  require(s == CUSOLVER_STATUS_SUCCESS, where, "{} failed (cuSOLVER status {})", what, int(s));
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// potri leaves H⁻¹ in the column-major lower triangle: copy it into the upper one.
__global__ void mirror_lower_to_upper(double* a, int64_t K) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= K * K) return;
  const int64_t i = idx % K, j = idx / K;  // a[idx] is column-major (i, j)
  if (i < j) a[idx] = a[j + i * K];
}

// The column-major upper factor as the row-major U the column loop reads, zeros below the diagonal.
__global__ void upper_to_row_major(const double* a, int64_t K, double* u) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= K * K) return;
  const int64_t i = idx / K, j = idx % K;  // u[idx] is row-major (i, j)
  u[idx] = j >= i ? a[i + j * K] : 0.0;
}

// U with H⁻¹ = UᵀU (row-major, upper) of a damped H, left on the device: the same three steps as
// LAPACK on the CPU (gptq.cpp; H symmetric, so its row- and column-major views agree).
DeviceArray<double> factor_on_device(const std::vector<double>& H, int64_t K, const std::string& where) {
  cusolverDnHandle_t solver = nullptr;
  check_cusolver(cusolverDnCreate(&solver), "cusolverDnCreate", where);
  struct Destroy {
    cusolverDnHandle_t s;
    ~Destroy() { cusolverDnDestroy(s); }
  } destroy{solver};
  const int n = int(K);
  DeviceArray<double> a(H.data(), H.size());
  DeviceArray<int> info(1);
  int lwork = 0, lwork_inv = 0, lwork_upper = 0;
  check_cusolver(cusolverDnDpotrf_bufferSize(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, &lwork),
                 "potrf_bufferSize", where);
  check_cusolver(cusolverDnDpotri_bufferSize(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, &lwork_inv),
                 "potri_bufferSize", where);
  check_cusolver(cusolverDnDpotrf_bufferSize(solver, CUBLAS_FILL_MODE_UPPER, n, a.get(), n, &lwork_upper),
                 "potrf_bufferSize", where);
  lwork = std::max({lwork, lwork_inv, lwork_upper, 1});
  DeviceArray<double> work{size_t(lwork)};
  auto info_value = [&] {
    int v = 0;
    NIBBLE_CUDA_CHECK(cudaMemcpy(&v, info.get(), sizeof(int), cudaMemcpyDeviceToHost));
    return v;
  };
  check_cusolver(cusolverDnDpotrf(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, work.get(), lwork, info.get()),
                 "potrf", where);
  int v = info_value();
  require(v == 0, where, "GPTQ: the damped Hessian is not positive definite (cuSOLVER potrf info {}); raise --percdamp", v);
  check_cusolver(cusolverDnDpotri(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, work.get(), lwork, info.get()),
                 "potri", where);
  v = info_value();
  require(v == 0, where, "GPTQ: inverting the Hessian failed (cuSOLVER potri info {})", v);
  mirror_lower_to_upper<<<blocks_for(K * K, 256), 256>>>(a.get(), K);
  NIBBLE_CUDA_CHECK_LAUNCH();
  check_cusolver(cusolverDnDpotrf(solver, CUBLAS_FILL_MODE_UPPER, n, a.get(), n, work.get(), lwork, info.get()),
                 "potrf", where);
  v = info_value();
  require(v == 0, where, "GPTQ: Cholesky of the inverse Hessian failed (cuSOLVER potrf info {})", v);
  work = DeviceArray<double>();
  DeviceArray<double> u(size_t(K * K));
  upper_to_row_major<<<blocks_for(K * K, 256), 256>>>(a.get(), K, u.get());
  NIBBLE_CUDA_CHECK_LAUNCH();
  return u;
}

// W in float64 with the dead channels' columns zeroed, as gptq.cpp starts its loop.
__global__ void widen_live_columns(const float* wf, const char* dead, int64_t N, int64_t K, double* w) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < N * K) w[idx] = dead[idx % K] ? 0.0 : double(wf[idx]);
}

// One lazy batch's column loop: its problem, state and outputs (gptq.cpp's layout).
struct ColumnLoop {
  double* w;            // [N, K] row-major; columns from the batch's first are current
  const double* u;      // [K, K] row-major upper factor
  const double* hdiag;  // [K] the clip search's weights
  double* err;          // [N, count] the batch's scaled errors, for the DGEMM
  int64_t N, K, M, group, keeper;
  int64_t i1, i2;
  FormatSpec weight, keep;
  bool keep_quantized;  // keepers in `keep` (INT8/FP8); else cast to fp16
  bool clip_search;
  GroupScale* row_scale;  // [N] the scale of each row's current group
  uint8_t* codes;         // [N, M]
  float* scales;          // [N / row_group, M / group], or null (FP8 main formats)
  uint8_t* zeros;         // same shape, or null (symmetric formats)
  uint8_t* keeper_codes;  // [N, keeper]
  float* keeper_values;   // [N, keeper] the stored values
  float* keeper_scales;   // [N]
  double* loss;           // [N / row_group] one running sum per warp's rows
};

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarpsPerBlock = 4;

// The range of W's rows [n0, n0 + rows) × columns [k0, k0 + width), the same on every lane (min
// and max are exact in any order).
__device__ GroupStats warp_stats(const ColumnLoop& a, int64_t n0, int rows, int64_t k0, int64_t width, int lane) {
  GroupStats s;
  for (int r = 0; r < rows; ++r)
    for (int64_t k = k0 + lane; k < k0 + width; k += 32) s.add(float(a.w[(n0 + r) * a.K + k]));
  for (int offset = 16; offset > 0; offset /= 2) {
    GroupStats other;
    other.min = __shfl_xor_sync(kFullMask, s.min, offset);
    other.max = __shfl_xor_sync(kFullMask, s.max, offset);
    s.merge(other);
  }
  return s;
}

// gptq.cpp's best_clip_scale: lane s <= 10 sums the Hessian-weighted rounding error of clip
// 1 - 0.05·s in the host's order (rows, then columns); the first smallest wins, on every lane.
__device__ GroupScale clip_searched_scale(const ColumnLoop& a, const GroupStats& stats, int64_t n0, int rows,
                                          int64_t k0, int64_t width, int lane) {
  const Format f = a.weight.format;
  FormatSpec trial = a.weight;
  double err = 0;
  if (lane <= 10) {
    trial.clip = 1.0f - 0.05f * float(lane);
    const GroupScale g = choose_scale(trial, stats);
    for (int64_t n = n0; n < n0 + rows; ++n)
      for (int64_t k = k0; k < k0 + width; ++k) {
        const float w = float(a.w[n * a.K + k]);
        const double d = w - decode_element(f, encode_element(f, w, g), g);
        err += a.hdiag[k] * d * d;
      }
  }
  int best = 0;
  double best_err = -1;
  for (int step = 0; step <= 10; ++step) {
    const double e = __shfl_sync(kFullMask, err, step);
    if (best_err < 0 || e < best_err) {
      best_err = e;
      best = step;
    }
  }
  trial.clip = 1.0f - 0.05f * float(best);
  return choose_scale(trial, stats);
}

// gptq.cpp's quantize: element (n, k) with its row's current scale; the stored value. Only lane
// 0 stores (every lane computes the same).
__device__ double quantize_element(const ColumnLoop& a, int64_t n, int64_t k, double w, bool store) {
  const GroupScale g = a.row_scale[n];
  if (k < a.M) {
    const uint8_t code = encode_element(a.weight.format, float(w), g);
    if (store) a.codes[n * a.M + k] = code;
    return decode_element(a.weight.format, code, g);
  }
  const int64_t at = n * a.keeper + (k - a.M);
  float v;
  if (a.keep_quantized) {
    const uint8_t code = encode_element(a.keep.format, float(w), g);
    if (store) a.keeper_codes[at] = code;
    v = decode_element(a.keep.format, code, g);
  } else {
    v = round_fp16(float(w));
  }
  if (store) a.keeper_values[at] = v;
  return v;
}

// One warp per row_group rows of W: the batch's columns in order, the rows' copies of them in
// shared memory, each lane updating the columns c ≡ lane (mod 32) of every row.
__global__ void gptq_column_loop(ColumnLoop a) {
  extern __shared__ double block_w[];
  const int lane = int(threadIdx.x % 32), warp = int(threadIdx.x / 32);
  const int rows = a.weight.row_group;
  const int64_t unit = int64_t(blockIdx.x) * (blockDim.x / 32) + warp;
  if (unit >= a.N / rows) return;
  const int64_t n0 = unit * rows, count = a.i2 - a.i1;
  double* sw = block_w + int64_t(warp) * rows * count;
  for (int r = 0; r < rows; ++r)
    for (int64_t c = lane; c < count; c += 32) sw[r * count + c] = a.w[(n0 + r) * a.K + a.i1 + c];

  // A group (or the keepers) starts only at a batch's first column (gptq.cpp's block_end): its
  // scale reads the group's columns of W, all current.
  if (a.i1 < a.M && a.i1 % a.group == 0) {
    const GroupStats stats = warp_stats(a, n0, rows, a.i1, a.group, lane);
    const GroupScale g = a.clip_search ? clip_searched_scale(a, stats, n0, rows, a.i1, a.group, lane)
                                       : choose_scale(a.weight, stats);
    if (lane == 0) {
      for (int r = 0; r < rows; ++r) a.row_scale[n0 + r] = g;
      const int64_t idx = unit * (a.M / a.group) + a.i1 / a.group;
      if (a.scales) a.scales[idx] = g.scale;
      if (a.zeros) a.zeros[idx] = g.zero;
    }
  } else if (a.i1 == a.M && a.keep_quantized) {
    for (int r = 0; r < rows; ++r) {  // one scale per row over all keepers
      const GroupScale g = choose_scale(a.keep, warp_stats(a, n0 + r, 1, a.M, a.keeper, lane));
      if (lane == 0) {
        a.row_scale[n0 + r] = g;
        a.keeper_scales[n0 + r] = g.scale;
      }
    }
  }
  __syncwarp();

  double loss = 0;
  for (int64_t i = a.i1; i < a.i2; ++i) {
    const int64_t c = i - a.i1;
    const double d = a.u[i * a.K + i];
    for (int r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      const double w = sw[r * count + c];
      const double q = quantize_element(a, n, i, w, lane == 0);
      const double e = (w - q) / d;
      loss += (w - q) * (w - q) / (d * d);
      if (lane == 0) a.err[n * count + c] = e;
      // The rest of the batch gets the error now; later batches get it in one product.
      for (int64_t j = lane; j < count; j += 32)
        if (j > c) sw[r * count + j] -= e * a.u[i * a.K + a.i1 + j];
    }
    __syncwarp();
  }
  if (lane == 0) a.loss[unit] += loss;
}

class CudaGptq final : public DeviceGptq {
 public:
  CudaGptq(const std::vector<float>& W, int64_t N, int64_t K, const std::vector<double>& H,
           const std::vector<char>& dead, const std::vector<double>& hdiag, const LinearQuantSpec& spec,
           bool clip_search, const std::string& where)
      : where_(where), u_(factor_on_device(H, K, where)), hdiag_(hdiag.data(), hdiag.size()) {
    const FormatSpec& ws = spec.weight;
    const int64_t M = K - spec.keeper;
    loop_ = ColumnLoop{};
    loop_.N = N;
    loop_.K = K;
    loop_.M = M;
    loop_.group = ws.group == 0 ? M : ws.group;
    loop_.keeper = spec.keeper;
    loop_.weight = ws;
    const std::optional<FormatSpec> ks = keeper_spec(spec.keeper_precision);
    loop_.keep_quantized = ks.has_value();
    if (ks) loop_.keep = *ks;
    loop_.clip_search = clip_search;
    {
      const DeviceArray<float> wf(W.data(), W.size());
      const DeviceArray<char> dead_d(dead.data(), dead.size());
      w_ = DeviceArray<double>(size_t(N * K));
      widen_live_columns<<<blocks_for(N * K, 256), 256>>>(wf.get(), dead_d.get(), N, K, w_.get());
      NIBBLE_CUDA_CHECK_LAUNCH();
      NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());  // before wf and dead_d are freed
    }
    row_scale_ = DeviceArray<GroupScale>(size_t(N));
    codes_ = DeviceArray<uint8_t>(size_t(N * M));
    const int64_t groups = N / ws.row_group * (M / loop_.group);
    if (scale_bytes(ws.format) > 0) scales_ = DeviceArray<float>(size_t(groups));
    if (format_is_asymmetric(ws.format)) zeros_ = DeviceArray<uint8_t>(size_t(groups));
    keeper_codes_ = DeviceArray<uint8_t>(size_t(N * spec.keeper));
    keeper_values_ = DeviceArray<float>(size_t(N * spec.keeper));
    keeper_scales_ = DeviceArray<float>(size_t(N));
    loss_ = DeviceArray<double>(size_t(N / ws.row_group));
    NIBBLE_CUDA_CHECK(cudaMemset(loss_.get(), 0, loss_.size() * sizeof(double)));
    loop_.w = w_.get();
    loop_.u = u_.get();
    loop_.hdiag = hdiag_.get();
    loop_.row_scale = row_scale_.get();
    loop_.codes = codes_.get();
    loop_.scales = scales_.get();
    loop_.zeros = zeros_.get();
    loop_.keeper_codes = keeper_codes_.get();
    loop_.keeper_values = keeper_values_.get();
    loop_.keeper_scales = keeper_scales_.get();
    loop_.loss = loss_.get();
    note_device_memory();
  }

  void run_block(int64_t i1, int64_t i2) override {
    const int64_t N = loop_.N, K = loop_.K, count = i2 - i1;
    if (err_.size() < size_t(N * count)) {
      NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());  // the old buffer may still be read by queued work
      err_ = DeviceArray<double>(size_t(N * count));
    }
    loop_.err = err_.get();
    loop_.i1 = i1;
    loop_.i2 = i2;
    const int rows = loop_.weight.row_group;
    const size_t warp_bytes = size_t(rows * count) * sizeof(double);
    const int warps = int(std::clamp<size_t>(48 * 1024 / warp_bytes, 1, kMaxWarpsPerBlock));
    const size_t bytes = warp_bytes * size_t(warps);
    if (bytes > 48 * 1024) {
      require(bytes <= 227 * 1024, where_,
              "GPTQ on the device: a batch of {} columns of {} rows ({} bytes of float64) exceeds a block's shared "
              "memory; lower --gptq-block",
              count, rows, bytes);
      NIBBLE_CUDA_CHECK(
          cudaFuncSetAttribute(gptq_column_loop, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    }
    gptq_column_loop<<<blocks_for(N / rows, warps), unsigned(32 * warps), bytes>>>(loop_);
    NIBBLE_CUDA_CHECK_LAUNCH();
    if (i2 == K) return;
    // Row-major W [N, K] is column-major Wᵀ [K, N]: Wᵀ[i2:, :] -= U[i1:i2, i2:]ᵀ · Eᵀ, where
    // U[i1:i2, i2:]ᵀ is the column-major view of U at (i2, i1) and Eᵀ that of err [N, count].
    const double minus_one = -1.0, one = 1.0;
    NIBBLE_CUBLAS_CHECK(cublasDgemm(blas_.h, CUBLAS_OP_N, CUBLAS_OP_N, int(K - i2), int(N), int(count), &minus_one,
                                    u_.get() + i1 * K + i2, int(K), err_.get(), int(count), &one, w_.get() + i2,
                                    int(K)));
  }

  void finish(GptqResult& r, std::vector<uint8_t>& keeper_codes, std::vector<float>& keeper_values,
              std::vector<float>& keeper_scales) override {
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    copy_back(codes_, r.main.codes);
    copy_back(scales_, r.main.scales);
    copy_back(zeros_, r.main.zeros);
    copy_back(keeper_values_, keeper_values);
    if (loop_.keep_quantized) {
      copy_back(keeper_codes_, keeper_codes);
      copy_back(keeper_scales_, keeper_scales);
    }
    std::vector<double> loss(loss_.size());
    copy_back(loss_, loss);
    r.loss = 0;
    for (double l : loss) r.loss += l;
  }

 private:
  template <typename T>
  static void copy_back(const DeviceArray<T>& d, std::vector<T>& h) {
    if (h.empty()) return;
    NIBBLE_CUDA_CHECK(cudaMemcpy(h.data(), d.get(), h.size() * sizeof(T), cudaMemcpyDeviceToHost));
  }

  std::string where_;
  CublasHandle blas_;
  DeviceArray<double> u_, hdiag_, w_, err_, loss_;
  DeviceArray<GroupScale> row_scale_;
  DeviceArray<uint8_t> codes_, zeros_, keeper_codes_;
  DeviceArray<float> scales_, keeper_values_, keeper_scales_;
  ColumnLoop loop_;
};

}  // namespace

std::vector<double> device_inverse_cholesky_upper(std::vector<double> H, int64_t K, const std::string& where) {
  const DeviceArray<double> u = factor_on_device(H, K, where);
  NIBBLE_CUDA_CHECK(cudaMemcpy(H.data(), u.get(), H.size() * sizeof(double), cudaMemcpyDeviceToHost));
  return H;
}

std::unique_ptr<DeviceGptq> make_device_gptq(const std::vector<float>& W, int64_t N, int64_t K, std::vector<double> H,
                                             const std::vector<char>& dead, const std::vector<double>& hdiag,
                                             const LinearQuantSpec& spec, bool clip_search, const std::string& where) {
  return std::make_unique<CudaGptq>(W, N, K, H, dead, hdiag, spec, clip_search, where);
}

}  // namespace nibble::quant
