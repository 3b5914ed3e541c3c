// The sampler on the GPU: the rows of a step's logits sampled where the LM head wrote them, by the
// rules of backend/sampling.h (the host's, the same functions), so that only the ids, their
// logprobs and the top-n logprobs cross to the host. The uniform draw of each row comes from its
// request's generator on the host: the GPU picks the token the CPU sampler picks from the same
// logits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/sampling.h"

namespace nibble::cuda {

// A row as the kernels take it: its rule and draw, and its penalized tokens [first, first + count)
// of the step's list.
struct DeviceRowSampling {
  SamplingRule rule;
  double uniform = 0;
  int32_t active = 0, first = 0, count = 0;
};

class DeviceSampler {
 public:
  // For steps of up to `max_rows` rows of `vocab` logits; the sort's scratch is for kSortRows rows.
  DeviceSampler(int64_t max_rows, int64_t vocab);
  // Samples logits row r ([rows.size(), vocab] on the device) by rows[r] on `stream` and waits for
  // the results. The rows' values are overwritten (penalties, sorting scratch).
  void sample(float* logits, std::span<const RowSampling> rows, cudaStream_t stream, SampledRows& out);

  static constexpr int64_t kSortRows = 64;  // rows sorted at once: bounds the scratch at 12 B × 64 × vocab

 private:
  int64_t max_rows_, vocab_;
  size_t chunk_bytes_ = 0;  // the draw's chunk sums of one row, in shared memory
  // Per step: each row's rule and where its penalized tokens sit in one list.
  DeviceArray<DeviceRowSampling> rows_;
  DeviceArray<PenalizedToken> penalized_;  // grows to the largest step's list
  DeviceArray<float> original_;            // the penalized tokens' logits before the penalties
  DeviceArray<double> log_z_;
  DeviceArray<int32_t> ids_, top_ids_;
  DeviceArray<float> logprobs_, top_logprobs_;
  // Candidate order of kSortRows rows at a time: ids 0..V-1 in, (logit, id) sorted out.
  DeviceArray<int32_t> iota_, sorted_ids_, offsets_;
  DeviceArray<float> sorted_logits_;
  DeviceArray<uint8_t> sort_temp_;
};

}  // namespace nibble::cuda
