#include "nibble/backend/backend.h"

#include <algorithm>

#include "nibble/backend/cpu/executor.h"
#include "nibble/backend/sampling.h"
#include "nibble/backend/tensor_parallel.h"
#include "nibble/core/error.h"
#include "nibble/model/model.h"
#if NIBBLE_HAVE_CUDA
#include "nibble/backend/cuda/executor.h"
#endif

namespace nibble {

bool cuda_device_available(std::string* why) {
#if NIBBLE_HAVE_CUDA
  return cuda::device_available(why);
#else
  if (why) *why = "this nibble was built without CUDA (nvcc was not found at build time)";
  return false;
#endif
}

void check_cuda_layer_support(const Layer& layer, int l) {
  // The append kernel would need a head_dim² matvec per K head and per query head after RoPE.
  check(layer.k_rotation.empty(), "--device cuda",
        "layer {} rotates K and the queries after RoPE by a learned rotation (--kv-rotation learned-k or learned), "
        "which the CUDA attention kernels do not apply; use --device cpu, or a file quantized with --kv-rotation "
        "learned-v (folded into the weights)", l);
}

void Executor::forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) {
  std::vector<float> logits;
  forward(batch, logits);
  const size_t V = size_t(config().vocab_size);
  ids.resize(logits.size() / V);
  for (size_t r = 0; r < ids.size(); ++r) {
    const float* row = logits.data() + r * V;
    ids[r] = int32_t(std::max_element(row, row + V) - row);
  }
}

void Executor::forward_sample(std::span<const BatchEntry> batch, std::span<const RowSampling> rows, SampledRows& out) {
  std::vector<float> logits;
  forward(batch, logits);
  sample_rows_host(logits, config().vocab_size, rows, out);
}

std::unique_ptr<Executor> make_executor(Model& model, const RuntimeOptions& opt) {
  if (opt.tp != 1) return make_tensor_parallel_executor(model, opt);
  if (opt.device == "cpu") return std::make_unique<cpu::CpuExecutor>(model, opt);
  check(opt.device == "cuda", "--device", "unknown device '{}' (cpu or cuda)", opt.device);
  for (size_t l = 0; l < model.layers().size(); ++l) check_cuda_layer_support(model.layers()[l], int(l));
  std::string why;
  check(cuda_device_available(&why), "--device cuda", "{}", why);
#if NIBBLE_HAVE_CUDA
  return cuda::make_executor(model, opt);
#else
  return nullptr;  // unreachable: cuda_device_available said no
#endif
}

std::unique_ptr<LayerStream> make_cuda_layer_stream(const ModelConfig& c, int64_t windows, int64_t ctx) {
  std::string why;
  check(cuda_device_available(&why), "--device cuda", "{}", why);
#if NIBBLE_HAVE_CUDA
  return cuda::make_layer_stream(c, windows, ctx);
#else
  return nullptr;  // unreachable: cuda_device_available said no
#endif
}

}  // namespace nibble
