// The FP16 baseline of every linear layer: Y[M, N] = X[M, K] · W[N, K]ᵀ (fp16 operands, fp32
// accumulation): cuBLAS, except for at most kGemvMaxRows rows (decode at small batch), where a
// weight-streaming kernel of ours reads the weights at memory speed. Every benchmark reports the
// W4A4 path against it.
#pragma once

#include <cstdint>

#include <cublas_v2.h>
#include <cuda_fp16.h>

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {

class LinearFp16 {
 public:
  LinearFp16();

  // Asynchronous on `stream`; row-major X [M, K], W [N, K], Y [M, N].
  void run(const __half* x, const __half* w, __half* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream);
  // The same product with fp32 output (the LM head's logits).
  void run(const __half* x, const __half* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream);
  // Measured on the H200 (7B decode step): at 8 rows the streaming kernel, bound by its fp32
  // multiply-adds and conversions, was slower than cuBLAS (6.6 ms a step against 5.6 at 16 rows).
  static constexpr int64_t kGemvMaxRows = 4;
  cublasHandle_t handle() const { return handle_.h; }

 private:
  CublasHandle handle_;
};

}  // namespace nibble::cuda
