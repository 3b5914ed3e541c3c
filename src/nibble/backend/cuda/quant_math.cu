// quant/device_math.h on a CUDA device: calibration statistics (a float64 column-sum kernel and
// cuBLAS SSYRK summed into float64) and the device's memory peak; GPTQ is gptq_device.cu.
#include <atomic>
#include <memory>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/quant/device_math.h"

namespace nibble::quant {

namespace {

using cuda::DeviceArray;

using cuda::CublasHandle;

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

}  // namespace nibble::quant
