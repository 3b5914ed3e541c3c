// Device memory with one owner: a cudaMalloc'd array freed with it, and the upload of fp32 host
// values as fp16 (the executor's weights, the W8A8 linears' biases).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/core/half.h"

namespace nibble::cuda {

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n) NIBBLE_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  DeviceArray(const T* host, size_t n) : DeviceArray(n) {
    if (n) NIBBLE_CUDA_CHECK(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// fp32 host values as a device fp16 array; values past fp16's range are refused, naming the tensor.
inline DeviceArray<__half> upload_fp16(const std::vector<float>& v, const std::string& what) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    require(std::fabs(v[i]) <= 65504.0f, what, "value {} at element {} does not fit fp16", v[i], i);
    bits[i] = float_to_fp16(v[i]);
  }
  return DeviceArray<__half>(reinterpret_cast<const __half*>(bits.data()), bits.size());
}

}  // namespace nibble::cuda
