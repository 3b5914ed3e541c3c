#include "nibble/backend/cuda/linear_fp16.h"

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {

LinearFp16::LinearFp16() { NIBBLE_CUBLAS_CHECK(cublasCreate(&handle_)); }

LinearFp16::~LinearFp16() {
  if (handle_) cublasDestroy(handle_);
}

namespace {

// Column-major view: Yᵀ [N, M] = W [N, K] (stored as K x N col-major, transposed) · Xᵀ [K, M].
void gemm(cublasHandle_t h, const __half* x, const __half* w, void* y, cudaDataType_t y_type, int64_t M, int64_t N,
          int64_t K, cudaStream_t stream) {
  NIBBLE_CUBLAS_CHECK(cublasSetStream(h, stream));
  const float alpha = 1.0f, beta = 0.0f;
  NIBBLE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &alpha, w, CUDA_R_16F, int(K),
                                   x, CUDA_R_16F, int(K), &beta, y, y_type, int(N), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
}

}  // namespace

void LinearFp16::run(const __half* x, const __half* w, __half* y, int64_t M, int64_t N, int64_t K,
                     cudaStream_t stream) {
  gemm(handle_, x, w, y, CUDA_R_16F, M, N, K, stream);
}

void LinearFp16::run(const __half* x, const __half* w, float* y, int64_t M, int64_t N, int64_t K,
                     cudaStream_t stream) {
  gemm(handle_, x, w, y, CUDA_R_32F, M, N, K, stream);
}

}  // namespace nibble::cuda
