// quant/device_math.h on a CUDA device: calibration statistics (a float64 column-sum kernel and
// cuBLAS SSYRK summed into float64) and GPTQ's factorisation (cuSOLVER) and lazy updates (DGEMM).
#include <cusolverDn.h>

#include <algorithm>
#include <atomic>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/quant/device_math.h"

namespace nibble::quant {

namespace {

using cuda::DeviceArray;
using cuda::require;

void check_cusolver(cusolverStatus_t s, const char* what, const std::string& where) {
  require(s == CUSOLVER_STATUS_SUCCESS, where, "{} failed (cuSOLVER status {})", what, int(s));
}

struct CublasHandle {
  cublasHandle_t h = nullptr;
  CublasHandle() { NIBBLE_CUBLAS_CHECK(cublasCreate(&h)); }
  ~CublasHandle() { cublasDestroy(h); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
};

// One thread per column: Σx² and Σ|x| over the rows, in float64, in row order (deterministic).
__global__ void column_sums(const float* x, int64_t rows, int64_t dim, double* sum_sq, double* sum_abs) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  double sq = 0, ab = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const double v = x[r * dim + c];
    sq += v * v;
    ab += fabs(v);
  }
  sum_sq[c] += sq;
  sum_abs[c] += ab;
}

__global__ void widen_f16(const __half* x, int64_t n, float* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __half2float(x[i]);
}

__global__ void accumulate_f64(const float* part, int64_t n, double* acc) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) acc[i] += double(part[i]);
}

class CudaStats final : public DeviceStats {
 public:
  CudaStats(int64_t dim, bool with_xtx) : dim_(dim), sum_sq_(size_t(dim)), sum_abs_(size_t(dim)) {
    NIBBLE_CUDA_CHECK(cudaMemset(sum_sq_.get(), 0, size_t(dim) * sizeof(double)));
    NIBBLE_CUDA_CHECK(cudaMemset(sum_abs_.get(), 0, size_t(dim) * sizeof(double)));
    if (!with_xtx) return;
    part_ = DeviceArray<float>(size_t(dim * dim));
    xtx_ = DeviceArray<double>(size_t(dim * dim));
    // SSYRK writes one triangle: the other stays 0 in part_, so adding all of part_ is exact.
    NIBBLE_CUDA_CHECK(cudaMemset(part_.get(), 0, size_t(dim * dim) * sizeof(float)));
    NIBBLE_CUDA_CHECK(cudaMemset(xtx_.get(), 0, size_t(dim * dim) * sizeof(double)));
  }

  void add(const float* host_x, int64_t rows) override {
    if (rows <= 0) return;
    reserve(rows);
    NIBBLE_CUDA_CHECK(cudaMemcpy(x_.get(), host_x, size_t(rows * dim_) * sizeof(float), cudaMemcpyHostToDevice));
    accumulate(rows, nullptr);
  }

  void add_device_f16(const void* x, int64_t rows, void* stream) override {
    if (rows <= 0) return;
    reserve(rows);
    const auto s = static_cast<cudaStream_t>(stream);
    const int64_t n = rows * dim_;
    widen_f16<<<unsigned((n + 255) / 256), 256, 0, s>>>(static_cast<const __half*>(x), n, x_.get());
    NIBBLE_CUDA_CHECK(cudaGetLastError());
    accumulate(rows, s);
  }

  void read(std::vector<double>& sum_sq, std::vector<double>& sum_abs, std::vector<double>* xtx_upper) override {
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());  // add_device_f16's work runs on the caller's stream
    note_device_memory();
    sum_sq.resize(size_t(dim_));
    sum_abs.resize(size_t(dim_));
    NIBBLE_CUDA_CHECK(cudaMemcpy(sum_sq.data(), sum_sq_.get(), size_t(dim_) * sizeof(double), cudaMemcpyDeviceToHost));
    NIBBLE_CUDA_CHECK(cudaMemcpy(sum_abs.data(), sum_abs_.get(), size_t(dim_) * sizeof(double), cudaMemcpyDeviceToHost));
    if (!xtx_upper) return;
    xtx_upper->resize(size_t(dim_ * dim_));
    NIBBLE_CUDA_CHECK(cudaMemcpy(xtx_upper->data(), xtx_.get(), size_t(dim_ * dim_) * sizeof(double),
                                 cudaMemcpyDeviceToHost));
  }

 private:
  void reserve(int64_t rows) {
    if (x_.size() >= size_t(rows * dim_)) return;
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());  // the old buffer may still be read by queued work
    x_ = DeviceArray<float>(size_t(rows * dim_));
  }

  // x_ [rows, dim] into the sums, on `s` (null: the legacy default stream, as add()'s copy).
  void accumulate(int64_t rows, cudaStream_t s) {
    column_sums<<<unsigned((dim_ + 255) / 256), 256, 0, s>>>(x_.get(), rows, dim_, sum_sq_.get(), sum_abs_.get());
    NIBBLE_CUDA_CHECK(cudaGetLastError());
    if (!xtx_.size()) return;
    NIBBLE_CUBLAS_CHECK(cublasSetStream(blas_.h, s));
    // x row-major [rows, dim] is column-major Xᵀ [dim, rows]: Xᵀ·X = A·Aᵀ with A = that view.
    // Column-major lower = row-major upper, the triangle InputStats keeps.
    const float one = 1.0f, zero = 0.0f;
    NIBBLE_CUBLAS_CHECK(cublasSsyrk(blas_.h, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, int(dim_), int(rows), &one, x_.get(),
                                    int(dim_), &zero, part_.get(), int(dim_)));
    const int64_t n = dim_ * dim_;
    accumulate_f64<<<unsigned((n + 255) / 256), 256, 0, s>>>(part_.get(), n, xtx_.get());
    NIBBLE_CUDA_CHECK(cudaGetLastError());
  }

  int64_t dim_;
  CublasHandle blas_;
  DeviceArray<double> sum_sq_, sum_abs_, xtx_;
  DeviceArray<float> x_, part_;
};

class CudaGptqUpdate final : public DeviceGptqUpdate {
 public:
  CudaGptqUpdate(const std::vector<double>& W, int64_t N, int64_t K, const std::vector<double>& U)
      : N_(N), K_(K), w_(W.data(), W.size()), u_(U.data(), U.size()) {
    note_device_memory();
  }

  void fetch(double* host_w, int64_t i1, int64_t i2) override {
    const size_t pitch = size_t(K_) * sizeof(double);
    NIBBLE_CUDA_CHECK(cudaMemcpy2D(host_w + i1, pitch, w_.get() + i1, pitch, size_t(i2 - i1) * sizeof(double),
                                   size_t(N_), cudaMemcpyDeviceToHost));
  }

  void update(const double* err, int64_t i1, int64_t i2) override {
    const int64_t count = i2 - i1;
    if (err_.size() < size_t(N_ * count)) err_ = DeviceArray<double>(size_t(N_ * count));
    NIBBLE_CUDA_CHECK(cudaMemcpy(err_.get(), err, size_t(N_ * count) * sizeof(double), cudaMemcpyHostToDevice));
    // Row-major W [N, K] is column-major Wᵀ [K, N]: Wᵀ[i2:, :] -= U[i1:i2, i2:]ᵀ · Eᵀ, where
    // U[i1:i2, i2:]ᵀ is the column-major view of U at (i2, i1) and Eᵀ that of err [N, count].
    const double minus_one = -1.0, one = 1.0;
    NIBBLE_CUBLAS_CHECK(cublasDgemm(blas_.h, CUBLAS_OP_N, CUBLAS_OP_N, int(K_ - i2), int(N_), int(count), &minus_one,
                                    u_.get() + i1 * K_ + i2, int(K_), err_.get(), int(count), &one, w_.get() + i2,
                                    int(K_)));
  }

 private:
  int64_t N_, K_;
  CublasHandle blas_;
  DeviceArray<double> w_, u_, err_;
};

std::atomic<int64_t> g_device_peak{0};

}  // namespace

void note_device_memory() {
  size_t free = 0, total = 0;
  NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  const int64_t used = int64_t(total - free);
  int64_t seen = g_device_peak.load();
  while (used > seen && !g_device_peak.compare_exchange_weak(seen, used)) {
  }
}

int64_t device_memory_peak() { return g_device_peak.load(); }

std::unique_ptr<DeviceStats> make_device_stats(int64_t dim, bool with_xtx) {
  return std::make_unique<CudaStats>(dim, with_xtx);
}

std::unique_ptr<DeviceGptqUpdate> make_device_gptq_update(const std::vector<double>& W, int64_t N, int64_t K,
                                                          const std::vector<double>& U) {
  return std::make_unique<CudaGptqUpdate>(W, N, K, U);
}

std::vector<double> device_inverse_cholesky_upper(std::vector<double> H, int64_t K, const std::string& where) {
  cusolverDnHandle_t solver = nullptr;
  check_cusolver(cusolverDnCreate(&solver), "cusolverDnCreate", where);
  struct Destroy {
    cusolverDnHandle_t s;
    ~Destroy() { cusolverDnDestroy(s); }
  } destroy{solver};
  const int n = int(K);
  DeviceArray<double> a(H.data(), H.size());
  DeviceArray<int> info(1);
  int lwork = 0;
  check_cusolver(cusolverDnDpotrf_bufferSize(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, &lwork),
                 "potrf_bufferSize", where);
  int lwork_inv = 0, lwork_upper = 0;
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
  // The same three steps as LAPACK on the CPU (gptq.cpp): H symmetric, so row- and column-major agree.
  check_cusolver(cusolverDnDpotrf(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, work.get(), lwork, info.get()),
                 "potrf", where);
  int v = info_value();
  require(v == 0, where, "GPTQ: the damped Hessian is not positive definite (cuSOLVER potrf info {}); raise --percdamp", v);
  check_cusolver(cusolverDnDpotri(solver, CUBLAS_FILL_MODE_LOWER, n, a.get(), n, work.get(), lwork, info.get()),
                 "potri", where);
  v = info_value();
  require(v == 0, where, "GPTQ: inverting the Hessian failed (cuSOLVER potri info {})", v);
  NIBBLE_CUDA_CHECK(cudaMemcpy(H.data(), a.get(), H.size() * sizeof(double), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < K; ++i)  // potri filled the row-major upper triangle: mirror it down
    for (int64_t j = 0; j < i; ++j) H[size_t(i * K + j)] = H[size_t(j * K + i)];
  NIBBLE_CUDA_CHECK(cudaMemcpy(a.get(), H.data(), H.size() * sizeof(double), cudaMemcpyHostToDevice));
  check_cusolver(cusolverDnDpotrf(solver, CUBLAS_FILL_MODE_UPPER, n, a.get(), n, work.get(), lwork, info.get()),
                 "potrf", where);
  v = info_value();
  require(v == 0, where, "GPTQ: Cholesky of the inverse Hessian failed (cuSOLVER potrf info {})", v);
  NIBBLE_CUDA_CHECK(cudaMemcpy(H.data(), a.get(), H.size() * sizeof(double), cudaMemcpyDeviceToHost));
  std::vector<double> U(size_t(K * K), 0.0);
  for (int64_t i = 0; i < K; ++i)  // column-major upper factor = row-major lower: transpose it
    for (int64_t j = i; j < K; ++j) U[size_t(i * K + j)] = H[size_t(i + j * K)];
  return U;
}

}  // namespace nibble::quant
