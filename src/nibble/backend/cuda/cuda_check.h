// CUDA / cuBLAS status checks that throw nibble::Error naming the call and the place.
// nvcc's C++20 front end cannot evaluate fmt's consteval format-string checks, so .cu files format
// with runtime format strings (cformat, require) instead of fmt::format / nibble::check.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "nibble/core/error.h"

namespace nibble::cuda {

template <typename... Args>
std::string cformat(const char* f, const Args&... args) {
  return fmt::vformat(f, fmt::make_format_args(args...));
}

// nibble::check for .cu files.
template <typename... Args>
void require(bool cond, const std::string& where, const char* f, const Args&... args) {
  if (!cond) throw Error(where, cformat(f, args...));
}

inline void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw Error(cformat("{}:{}", file, line), cformat("{}: {} ({})", what, cudaGetErrorString(e), int(e)));
}
inline void check_cublas(cublasStatus_t e, const char* what, const char* file, int line) {
  if (e != CUBLAS_STATUS_SUCCESS)
    throw Error(cformat("{}:{}", file, line), cformat("{}: {} ({})", what, cublasGetStatusString(e), int(e)));
}

}  // namespace nibble::cuda

#define NIBBLE_CUDA_CHECK(call) ::nibble::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define NIBBLE_CUBLAS_CHECK(call) ::nibble::cuda::check_cublas((call), #call, __FILE__, __LINE__)
// After a kernel launch: launch-configuration errors now, not at the next synchronizing call.
#define NIBBLE_CUDA_CHECK_LAUNCH() ::nibble::cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

namespace nibble::cuda {

// A cuBLAS handle with one owner.
struct CublasHandle {
  cublasHandle_t h = nullptr;
  CublasHandle() { NIBBLE_CUBLAS_CHECK(cublasCreate(&h)); }
  ~CublasHandle() { cublasDestroy(h); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
};

}  // namespace nibble::cuda
