// Calibration: random windows of real text, and the statistics Atom and GPTQ need about the
// input of every linear layer (per-channel Σx² and Σ|x|, and XᵀX), accumulated in float64.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace nibble::quant {

class DeviceStats;

// Throws nibble::Error(where, ...) when `bytes` (what `what` would take) exceed this machine's
// physical memory: refused up front rather than grown until the kernel kills the process.
void check_fits_in_memory(double bytes, const std::string& what, const std::string& where);

// `count` windows of `ctx` tokens starting at uniformly random offsets (seeded), as GPTQ and
// Atom draw them from their calibration text. Throws when the text is shorter than one window.
std::vector<std::vector<int32_t>> sample_calibration_windows(std::span<const int32_t> tokens, int64_t count,
                                                             int64_t ctx, uint64_t seed, const std::string& where);

// Statistics of one linear layer's input over all calibration tokens. Each add()'s XᵀX is one
// fp32 product (BLAS, or cuBLAS SSYRK without TF32 on the device), summed into float64; Σx² and
// Σ|x| are float64 throughout. On the device (quant/device_math.h) the sums stay there until read.
class InputStats {
 public:
  InputStats() = default;
  InputStats(int64_t dim, bool with_xtx, bool on_device = false);

  // Adds rows of x ([rows, dim], host memory).
  void add(const float* x, int64_t rows);
  // Adds fp16 rows already on the device (statistics made with on_device; quant/device_math.h).
  void add_device_f16(const void* x, int64_t rows, void* stream);

  int64_t dim() const { return dim_; }
  int64_t count() const { return count_; }
  const std::vector<double>& sum_sq() const { return read().sum_sq_; }    // Σ x_c², the Hessian's diagonal / 2
  const std::vector<double>& sum_abs() const { return read().sum_abs_; }  // Σ |x_c|
  bool has_xtx() const { return with_xtx_; }
  // XᵀX [dim, dim], full (both triangles filled).
  std::vector<double> xtx() const;
  // The statistics of the inputs x_c · d_c (a folded per-channel scale), without another pass.
  void scale_channels(const std::vector<double>& d);

 private:
  const InputStats& read() const;  // the device's sums into the host vectors, when on the device

  int64_t dim_ = 0, count_ = 0;
  bool with_xtx_ = false;
  mutable std::vector<double> sum_sq_, sum_abs_;
  mutable std::vector<double> xtx_;  // upper triangle accumulated, mirrored by xtx()
  std::shared_ptr<DeviceStats> device_;
  mutable bool read_ = true;  // the host vectors hold the device's sums
};

}  // namespace nibble::quant
