// What the CUDA benches share: deterministic non-zero fills (zeros run faster than real data),
// device allocation, L2-aware input rotation, the timing loop and the device's copy bandwidth.
// Timing: CUDA events around batches of launches after a warm-up, median of the batches.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::bench {

inline size_t g_l2 = 50 << 20;  // bytes of L2; main() sets it from the device
inline int g_sms = 132;

__host__ __device__ inline uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return uint32_t(x);
}
__host__ __device__ inline float unit(uint64_t seed, uint64_t i) {  // [0, 1)
  return float(hash32(seed * 0x9e3779b97f4a7c15ull + i) >> 8) * 0x1p-24f;
}

// Uniform in [-range, range).
static __global__ void fill_half(__half* p, size_t n, float range, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2half(range * (2.0f * unit(seed, i) - 1.0f));
}
static __global__ void fill_float(float* p, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) p[i] = v;
}
static __global__ void fill_bytes(uint8_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = uint8_t(hash32(seed * 0x9e3779b97f4a7c15ull + i));
}

template <typename T>
T* dalloc(size_t count) {
  T* p = nullptr;
  NIBBLE_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  return p;
}

// Copies of an input set needed so that rotating over them does not run from L2.
inline int rotations(size_t bytes_per_set) {
  return int(std::clamp<size_t>((4 * g_l2 + bytes_per_set - 1) / bytes_per_set, 1, 16));
}

// Median milliseconds per launch of launch(rotation index).
inline double time_ms(const std::function<void(int)>& launch, int rots) {
  cudaEvent_t a, b;
  NIBBLE_CUDA_CHECK(cudaEventCreate(&a));
  NIBBLE_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch(i % rots);
  NIBBLE_CUDA_CHECK(cudaEventRecord(a));
  for (int i = 0; i < 3; ++i) launch(i % rots);
  NIBBLE_CUDA_CHECK(cudaEventRecord(b));
  NIBBLE_CUDA_CHECK(cudaEventSynchronize(b));
  float est = 0;
  NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&est, a, b));
  est /= 3;
  const int batch = std::clamp(int(0.3 / std::max(est, 1e-4f)), 1, 40);
  const int reps = std::clamp(int(40.0 / std::max(est * batch, 1e-3f)), 7, 31);
  std::vector<float> t;
  int r = 0;
  for (int rep = 0; rep < reps; ++rep) {
    NIBBLE_CUDA_CHECK(cudaEventRecord(a));
    for (int i = 0; i < batch; ++i) launch(r++ % rots);
    NIBBLE_CUDA_CHECK(cudaEventRecord(b));
    NIBBLE_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / float(batch));
  }
  NIBBLE_CUDA_CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// GB/s of a 1 GiB device-to-device copy, counting read + write.
inline double copy_bandwidth() {
  const size_t bytes = size_t(1) << 30;
  uint8_t* src = dalloc<uint8_t>(bytes);
  uint8_t* dst = dalloc<uint8_t>(bytes);
  fill_bytes<<<1024, 256>>>(src, bytes, 1);
  const double ms = time_ms([&](int) { NIBBLE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 1);
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

}  // namespace nibble::bench
