// The arithmetic of calibration and GPTQ that `nibble quantize --device cuda` moves to the GPU
// (backend/cuda/quant_math.cu): the input statistics and GPTQ's inverse-Hessian factor and lazy
// batch updates. The CPU code (calibrate.cpp, gptq.cpp) is the reference these are tested against
// (tests/gpu/test_quant_math.cu). Every make_* throws nibble::Error when nibble was built without
// CUDA or no device is present.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace nibble::quant {

// Σx², Σ|x| and the upper triangle of XᵀX (row-major) of a linear's inputs, accumulated on the
// device: per add() one fp32 SSYRK (cuBLAS, no TF32), summed in float64; Σx² and Σ|x| in float64.
class DeviceStats {
 public:
  virtual ~DeviceStats() = default;
  virtual void add(const float* host_x, int64_t rows) = 0;
  // Rows already on the device: fp16 [rows, dim] (a LayerStream's DeviceRows), queued on `stream`
  // (a cudaStream_t) after the kernel that wrote them; widened to fp32 (exact), then as add().
  virtual void add_device_f16(const void* x, int64_t rows, void* stream) = 0;
  // The sums so far; xtx_upper (when given) gets [dim, dim] with the upper triangle filled.
  virtual void read(std::vector<double>& sum_sq, std::vector<double>& sum_abs, std::vector<double>* xtx_upper) = 0;
};
std::unique_ptr<DeviceStats> make_device_stats(int64_t dim, bool with_xtx);

// The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU, row-major) of a symmetric positive-definite H by
// cuSOLVER (potrf, potri, potrf): gptq_inverse_hessian_factor's factorisation on the device.
std::vector<double> device_inverse_cholesky_upper(std::vector<double> H, int64_t K, const std::string& where);

// GPTQ's weight W [N, K] (row-major, float64) resident on the device with the factor U [K, K]:
// the column loop fetches a block of columns, quantizes it on the host, and hands back its scaled
// errors E [N, count], which update the later columns: W[:, i2:] -= E · U[i1:i2, i2:] (cuBLAS DGEMM).
class DeviceGptqUpdate {
 public:
  virtual ~DeviceGptqUpdate() = default;
  // W[:, i1:i2] into host_w (row-major [N, K], the other columns untouched).
  virtual void fetch(double* host_w, int64_t i1, int64_t i2) = 0;
  virtual void update(const double* err, int64_t i1, int64_t i2) = 0;
};
std::unique_ptr<DeviceGptqUpdate> make_device_gptq_update(const std::vector<double>& W, int64_t N, int64_t K,
                                                          const std::vector<double>& U);

// The device memory in use (cudaMemGetInfo: this process and any other), noted where calibration
// holds the most (a layer pass of the stream, statistics read, GPTQ's upload); the peak noted so
// far. 0 when nothing was noted (no CUDA).
void note_device_memory();
int64_t device_memory_peak();

}  // namespace nibble::quant
