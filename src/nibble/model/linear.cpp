#include "nibble/model/linear.h"

#include "nibble/backend/cpu/ops.h"
#include "nibble/core/error.h"

namespace nibble {

DenseLinear::DenseLinear(int64_t in, int64_t out, std::vector<float> weight, std::vector<float> bias,
                         int storage_bytes_per_weight)
    : Linear(in, out), weight_(std::move(weight)), bias_(std::move(bias)),
      storage_bytes_per_weight_(storage_bytes_per_weight) {
  check(int64_t(weight_.size()) == in * out, "DenseLinear", "weight has {} values, expected {}x{}", weight_.size(),
        out, in);
  check(bias_.empty() || int64_t(bias_.size()) == out, "DenseLinear", "bias has {} values, expected {}", bias_.size(),
        out);
}

void DenseLinear::forward(const float* x, int64_t rows, float* y) const {
  const int64_t in = in_features(), out = out_features();
  if (!bias_.empty())
    for (int64_t r = 0; r < rows; ++r) std::copy(bias_.begin(), bias_.end(), y + r * out);
  cpu::gemm_nt(rows, out, in, x, weight_.data(), bias_.empty() ? 0.0f : 1.0f, y);
}

int64_t DenseLinear::storage_bytes() const {
  return int64_t(weight_.size() + bias_.size()) * storage_bytes_per_weight_;
}

}  // namespace nibble
