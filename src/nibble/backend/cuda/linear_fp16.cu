#include "nibble/backend/cuda/linear_fp16.h"

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {

LinearFp16::LinearFp16() { NIBBLE_CUBLAS_CHECK(cublasCreate(&handle_)); }

LinearFp16::~LinearFp16() {
  if (handle_) cublasDestroy(handle_);
}

void LinearFp16::run(const __half* x, const __half* w, __half* y, int64_t M, int64_t N, int64_t K,
                     cudaStream_t stream) {
  // Column-major view: Yᵀ [N, M] = W [N, K] (stored as Kx N col-major, transposed) · Xᵀ [K, M].
  NIBBLE_CUBLAS_CHECK(cublasSetStream(handle_, stream));
  const float alpha = 1.0f, beta = 0.0f;
  NIBBLE_CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &alpha, w, CUDA_R_16F,
                                   int(K), x, CUDA_R_16F, int(K), &beta, y, CUDA_R_16F, int(N), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}

}  // namespace nibble::cuda
