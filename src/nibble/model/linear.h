// Linear layers: y = x · Wᵀ (+ b). The forward pass sees only this interface; a quantized
// linear (quant/) applies its own input permutation and activation quantizer inside forward().
#pragma once

#include <cstdint>
#include <vector>

namespace nibble {

class Linear {
 public:
  Linear(int64_t in, int64_t out) : in_(in), out_(out) {}
  virtual ~Linear() = default;

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  // x: [rows, in] row-major, y: [rows, out]. Must be thread-safe (no mutable state).
  virtual void forward(const float* x, int64_t rows, float* y) const = 0;
  // Bytes this layer's weights take in storage (for model-size reports).
  virtual int64_t storage_bytes() const = 0;

 private:
  int64_t in_, out_;
};

// Full-precision weights held as fp32, products through BLAS: the reference and FP16 path.
class DenseLinear final : public Linear {
 public:
  // weight: [out, in] row-major; bias empty or [out]. `storage_bytes_per_weight` is what the
  // source stored (2 for fp16/bf16 checkpoints) so size reports stay honest.
  DenseLinear(int64_t in, int64_t out, std::vector<float> weight, std::vector<float> bias = {},
              int storage_bytes_per_weight = 2);

  void forward(const float* x, int64_t rows, float* y) const override;
  int64_t storage_bytes() const override;

  const std::vector<float>& weight() const { return weight_; }
  std::vector<float>& weight() { return weight_; }
  const std::vector<float>& bias() const { return bias_; }
  std::vector<float>& bias() { return bias_; }

 private:
  std::vector<float> weight_, bias_;
  int storage_bytes_per_weight_;
};

}  // namespace nibble
