// The CUDA backend's entry points (plain C++: no CUDA type crosses this header).
#pragma once

#include <memory>
#include <string>

#include "nibble/backend/backend.h"

namespace nibble::cuda {

bool device_available(std::string* why);

// Uploads `model`'s weights (FP16 linears through cuBLAS) and sizes the paged KV pool. A format
// without a GPU kernel is refused here, naming the layer and the format.
std::unique_ptr<Executor> make_executor(const Model& model, const RuntimeOptions& opt);

std::unique_ptr<LayerStream> make_layer_stream(const ModelConfig& c, int64_t windows, int64_t ctx);

}  // namespace nibble::cuda
