// The arithmetic of calibration and GPTQ that `nibble quantize --device cuda` moves to the GPU
// (backend/cuda/quant_math.cu, gptq_device.cu): the input statistics and GPTQ. The CPU code
// (calibrate.cpp, gptq.cpp) is the reference these are tested against (tests/gpu/test_quant_math.cu). Every make_* throws nibble::Error when nibble was built without
// CUDA or no device is present.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nibble/quant/gptq.h"

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

// GPTQ on the device (backend/cuda/gptq_device.cu), one linear: W (widened to float64, the dead
// channels zeroed) and the factor U of H⁻¹ (cuSOLVER, as device_inverse_cholesky_upper) stay there.
// run_block is one lazy batch [i1, i2) of gptq.cpp's loop: the column loop (one warp per row
// group of W: group scales with the clip search where a group starts, rounding by format.h's
// functions, the scaled errors, the updates within the block), then W[:, i2:] -= E · U[i1:i2, i2:]
// (cuBLAS DGEMM). Its arithmetic is the host loop's operation for operation (both compiled without
// FMA contraction): the codes equal the CPU's but where the factor's or the DGEMM's last bits move
// a value across a rounding boundary. finish() copies the results into gptq.cpp's layout.
class DeviceGptq {
 public:
  virtual ~DeviceGptq() = default;
  virtual void run_block(int64_t i1, int64_t i2) = 0;
  // r.main (codes, scales, zeros: sized by the caller), r.loss, and the keepers' codes [N, keeper],
  // values [N, keeper] and per-row scales [N].
  virtual void finish(GptqResult& r, std::vector<uint8_t>& keeper_codes, std::vector<float>& keeper_values,
                      std::vector<float>& keeper_scales) = 0;
};
// W [N, K] row-major in GPTQ's order; H [K, K] damped (gptq.cpp), dead[k] = 1 for dead channels;
// hdiag the undamped diag(H), the clip search's weights.
std::unique_ptr<DeviceGptq> make_device_gptq(const std::vector<float>& W, int64_t N, int64_t K, std::vector<double> H,
                                             const std::vector<char>& dead, const std::vector<double>& hdiag,
                                             const LinearQuantSpec& spec, bool clip_search, const std::string& where);

// The device memory in use (cudaMemGetInfo: this process and any other), noted where calibration
// holds the most (a layer pass of the stream, statistics read, GPTQ's upload); the peak noted so
// far. 0 when nothing was noted (no CUDA).
void note_device_memory();
int64_t device_memory_peak();

}  // namespace nibble::quant
