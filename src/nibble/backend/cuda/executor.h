// The CUDA backend's entry points (plain C++: no CUDA type crosses this header).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "nibble/backend/backend.h"

namespace nibble::cuda {

bool device_available(std::string* why);

// Uploads `model`'s weights (FP16 linears through cuBLAS) and sizes the paged KV pool. A format
// without a GPU kernel is refused here, naming the layer and the format.
std::unique_ptr<Executor> make_executor(const Model& model, const RuntimeOptions& opt);

// `world` executors, rank r on GPU r over shard(r) (backend/shard_plan.h, its TensorParallelRank
// set; made and dropped one at a time, so the host holds one shard beside the model), joined by
// NCCL communicators (ncclCommInitAll). Throws nibble::Error when fewer GPUs are visible, NCCL is
// missing or fails, or a shard has no CUDA kernel.
std::vector<std::unique_ptr<Executor>> make_tensor_parallel_ranks(
    int world, const std::function<std::unique_ptr<Model>(int rank)>& shard, const RuntimeOptions& opt);

std::unique_ptr<LayerStream> make_layer_stream(const ModelConfig& c, int64_t windows, int64_t ctx);

}  // namespace nibble::cuda
