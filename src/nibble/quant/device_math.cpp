// Without CUDA: the device's arithmetic is refused by name (with CUDA, backend/cuda/quant_math.cu).
#include "nibble/quant/device_math.h"

#if !NIBBLE_HAVE_CUDA
#include "nibble/core/error.h"

namespace nibble::quant {

namespace {
[[noreturn]] void no_cuda() {
  throw Error("--device cuda", "this nibble was built without CUDA (nvcc was not found at build time)");
}
}  // namespace

std::unique_ptr<DeviceStats> make_device_stats(int64_t, bool) { no_cuda(); }
std::vector<double> device_inverse_cholesky_upper(std::vector<double>, int64_t, const std::string&) { no_cuda(); }
std::unique_ptr<DeviceGptq> make_device_gptq(const std::vector<float>&, int64_t, int64_t, std::vector<double>,
                                             const std::vector<char>&, const std::vector<double>&,
                                             const LinearQuantSpec&, bool, const std::string&) {
  no_cuda();
}

void note_device_memory() {}
int64_t device_memory_peak() { return 0; }

}  // namespace nibble::quant
#endif
