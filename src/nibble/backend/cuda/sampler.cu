#include "nibble/backend/cuda/sampler.h"

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <vector>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/warp_best.cuh"

namespace nibble::cuda {

namespace {

// One block per row: at batch 1 one block is all the GPU gets, so it is wide.
constexpr int kThreads = 1024;

// The block's reduction of v by `op`, in a fixed order (the same sum every run); every thread gets it.
template <class T, class Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T partial[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  T total = partial[0];
  for (int w = 1; w < kThreads / 32; ++w) total = op(total, partial[w]);
  __syncthreads();  // partial is reused by the next call
  return total;
}

struct Ranked {  // a logit and its id
  float v;
  int32_t i;
};
__device__ Ranked none() { return {-INFINITY, INT32_MAX}; }

// The first of the row's values in candidate order (ranks_before) that comes after `after` (every
// value when `excluding` is false); every thread gets it. The warps' winners go through separate
// value and id arrays and one thread, as argmax_kernel (model_kernels.cu) does: device run 1 read
// a winner whose id held its value's bits through the struct array this had before.
__device__ Ranked block_best(const float* row, int64_t V, Ranked after, bool excluding) {
  __shared__ float warp_v[kThreads / 32];
  __shared__ int32_t warp_i[kThreads / 32];
  __shared__ float best_v;
  __shared__ int32_t best_i;
  float bv = -INFINITY;
  int32_t bi = INT32_MAX;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const float v = row[j];
    if (excluding && !ranks_before(after.v, after.i, v, int32_t(j))) continue;
    if (ranks_before(v, int32_t(j), bv, bi)) bv = v, bi = int32_t(j);
  }
  warp_best(bv, bi);
  if (threadIdx.x % 32 == 0) warp_v[threadIdx.x / 32] = bv, warp_i[threadIdx.x / 32] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w)
      if (ranks_before(warp_v[w], warp_i[w], bv, bi)) bv = warp_v[w], bi = warp_i[w];
    best_v = bv, best_i = bi;
  }
  __syncthreads();
  const Ranked best{best_v, best_i};
  __syncthreads();  // the shared values are reused by the next call
  return best;
}

// Per row, on its original logits: log Σ exp (for the logprobs) and the top-n logprobs; then the
// penalties, in place, each penalized token's original logit kept aside.
__global__ void __launch_bounds__(kThreads)
    prepare_rows_kernel(float* logits, int64_t V, const DeviceRowSampling* rows, const PenalizedToken* penalized,
                        float* original, double* log_z, int32_t* top_ids, float* top_logprobs, int32_t top_n) {
  const DeviceRowSampling row = rows[blockIdx.x];
  if (!row.active) return;
  float* l = logits + blockIdx.x * V;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) mx = fmaxf(mx, l[j]);
  mx = block_reduce(mx, [](float a, float b) { return fmaxf(a, b); });
  double z = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) z += exp(double(l[j]) - double(mx));
  z = block_reduce(z, [](double a, double b) { return a + b; });
  const double lz = double(mx) + log(z);
  if (threadIdx.x == 0) log_z[blockIdx.x] = lz;
  Ranked last = none();
  const int32_t top = row.rule.top_logprobs < V ? row.rule.top_logprobs : int32_t(V);
  for (int32_t k = 0; k < top; ++k) {
    last = block_best(l, V, last, k > 0);
    if (threadIdx.x == 0) {
      top_ids[blockIdx.x * top_n + k] = last.i;
      top_logprobs[blockIdx.x * top_n + k] = logprob_of(last.v, lz);
    }
  }
  __syncthreads();  // every read of the original row is done
  for (int32_t k = threadIdx.x; k < row.count; k += kThreads) {
    const PenalizedToken p = penalized[row.first + k];  // distinct ids: no two threads write one logit
    const float o = l[p.id];
    original[row.first + k] = o;
    l[p.id] = penalized_logit(o, p.generated, row.rule);
  }
}

// ids 0..V-1 for each of `rows` rows: the values the sort carries along.
__global__ void iota_rows_kernel(int32_t* ids, int64_t V, int64_t rows) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * V; i += int64_t(gridDim.x) * blockDim.x)
    ids[i] = int32_t(i % V);
}
__global__ void offsets_kernel(int32_t* offsets, int64_t V, int64_t rows) {
  for (int64_t r = threadIdx.x; r <= rows; r += blockDim.x) offsets[r] = int32_t(r * V);
}

// Per row: the argmax of the penalized row (greedy) or the draw over its candidates in order
// (sorted_*: the row's penalized logits and their ids, sorted by the sort: larger first, stable, so
// the lower id first on a tie, as ranks_before); then the pick's logprob from its original logit.
// Dynamic shared memory: a double per kDrawChunk candidates.
__global__ void __launch_bounds__(kThreads)
    pick_kernel(const float* logits, int64_t V, const DeviceRowSampling* rows, const PenalizedToken* penalized,
                const float* original, const double* log_z, const float* sorted_logits, const int32_t* sorted_ids,
                int32_t* ids, float* logprobs) {
  const DeviceRowSampling row = rows[blockIdx.x];
  if (!row.active) return;
  const float* l = logits + blockIdx.x * V;
  __shared__ int32_t pick;
  if (row.rule.temperature == 0) {
    const Ranked best = block_best(l, V, none(), false);
    if (threadIdx.x == 0) pick = best.i == INT32_MAX ? 0 : best.i;  // an all-NaN row (the executor refuses it)
  } else {
    // The host's draw (backend/sampling.h): the candidates' end and the chunk sums in parallel,
    // then one thread finds the crossing chunks and walks them.
    extern __shared__ double chunk_sums[];
    __shared__ unsigned long long keep_shared;
    const float* s = sorted_logits + blockIdx.x * V;
    const SamplingRule& rule = row.rule;
    const int64_t k = rule.top_k > 0 && rule.top_k < V ? rule.top_k : V;
    const float best = s[0];
    auto w = [&](int64_t i) { return draw_weight(s[i], best, rule.temperature); };
    if (threadIdx.x == 0) keep_shared = (unsigned long long)k;
    __syncthreads();
    if (rule.min_p > 0)
      for (int64_t i = threadIdx.x; i < k; i += kThreads)
        if (w(i) < rule.min_p) {  // this thread's first below: the least of them ends the candidates
          atomicMin(&keep_shared, (unsigned long long)i);
          break;
        }
    __syncthreads();
    const int64_t keep = int64_t(keep_shared);
    for (int64_t c = threadIdx.x; c <= (keep - 1) / kDrawChunk; c += kThreads) chunk_sums[c] = chunk_weight(w, c, keep);
    __syncthreads();
    if (threadIdx.x == 0)
      pick = sorted_ids[blockIdx.x * V + draw_among(w, [](int64_t c) { return chunk_sums[c]; }, keep, rule, row.uniform)];
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  float o = l[pick];
  for (int32_t k = 0; k < row.count; ++k)
    if (penalized[row.first + k].id == pick) {
      o = original[row.first + k];
      break;
    }
  ids[blockIdx.x] = pick;
  logprobs[blockIdx.x] = logprob_of(o, log_z[blockIdx.x]);
}

size_t sort_temp_bytes(int64_t rows, int64_t V, const int32_t* offsets) {
  size_t bytes = 0;
  NIBBLE_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), int(rows * V), int(rows), offsets,
      offsets + 1));
  return bytes;
}

// Grows `a` to at least n elements (its old contents are not kept).
template <class T>
void reserve(DeviceArray<T>& a, size_t n) {
  if (a.size() < n) a = DeviceArray<T>(std::max(n, 2 * a.size()));
}

}  // namespace

DeviceSampler::DeviceSampler(int64_t max_rows, int64_t vocab) : max_rows_(max_rows), vocab_(vocab) {
  require(vocab * kSortRows < (int64_t(1) << 31), "DeviceSampler", "a vocabulary of {} is too large for the sort",
          vocab);
  const int64_t sort_rows = std::min(max_rows, kSortRows);
  chunk_bytes_ = size_t((vocab + kDrawChunk - 1) / kDrawChunk) * sizeof(double);
  require(chunk_bytes_ <= 48 * 1024, "DeviceSampler", "a vocabulary of {} needs {} bytes of chunk sums in shared memory",
          vocab, chunk_bytes_);
  rows_ = DeviceArray<DeviceRowSampling>(size_t(max_rows));
  log_z_ = DeviceArray<double>(size_t(max_rows));
  ids_ = DeviceArray<int32_t>(size_t(max_rows));
  logprobs_ = DeviceArray<float>(size_t(max_rows));
  iota_ = DeviceArray<int32_t>(size_t(sort_rows * vocab));
  sorted_ids_ = DeviceArray<int32_t>(size_t(sort_rows * vocab));
  sorted_logits_ = DeviceArray<float>(size_t(sort_rows * vocab));
  offsets_ = DeviceArray<int32_t>(size_t(sort_rows + 1));
  iota_rows_kernel<<<1024, 256>>>(iota_.get(), vocab, sort_rows);
  NIBBLE_CUDA_CHECK_LAUNCH();
  offsets_kernel<<<1, 256>>>(offsets_.get(), vocab, sort_rows);
  NIBBLE_CUDA_CHECK_LAUNCH();
  sort_temp_ = DeviceArray<uint8_t>(std::max<size_t>(sort_temp_bytes(sort_rows, vocab, offsets_.get()), 16));
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
}

void DeviceSampler::sample(float* logits, std::span<const RowSampling> rows, cudaStream_t stream, SampledRows& out) {
  const int64_t n = int64_t(rows.size()), V = vocab_;
  require(n <= max_rows_, "DeviceSampler", "{} rows, more than the {} it was made for", n, max_rows_);
  int32_t top_n = 0;
  std::vector<DeviceRowSampling> host_rows(rows.size());
  std::vector<PenalizedToken> host_penalized;
  for (size_t r = 0; r < rows.size(); ++r) {
    if (!rows[r].active) continue;
    DeviceRowSampling& d = host_rows[r];
    d = {rows[r].rule, rows[r].uniform, 1, int32_t(host_penalized.size()), int32_t(rows[r].penalized.size())};
    for (const PenalizedToken& p : rows[r].penalized)
      require(p.id >= 0 && p.id < V, "DeviceSampler", "row {}: penalized token {} outside the vocabulary", r, p.id);
    host_penalized.insert(host_penalized.end(), rows[r].penalized.begin(), rows[r].penalized.end());
    top_n = std::max(top_n, int32_t(std::min<int64_t>(d.rule.top_logprobs, V)));
  }
  out.resize(rows.size(), top_n);
  if (n == 0) return;
  reserve(penalized_, std::max<size_t>(host_penalized.size(), 1));
  reserve(original_, penalized_.size());
  reserve(top_ids_, std::max<size_t>(size_t(n * top_n), 1));
  reserve(top_logprobs_, top_ids_.size());
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(rows_.get(), host_rows.data(), host_rows.size() * sizeof(DeviceRowSampling),
                                    cudaMemcpyHostToDevice, stream));
  if (!host_penalized.empty())
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(penalized_.get(), host_penalized.data(),
                                      host_penalized.size() * sizeof(PenalizedToken), cudaMemcpyHostToDevice, stream));
  prepare_rows_kernel<<<unsigned(n), kThreads, 0, stream>>>(logits, V, rows_.get(), penalized_.get(), original_.get(),
                                                             log_z_.get(), top_ids_.get(), top_logprobs_.get(), top_n);
  NIBBLE_CUDA_CHECK_LAUNCH();
  for (int64_t r0 = 0; r0 < n; r0 += kSortRows) {
    const int64_t m = std::min(kSortRows, n - r0);
    const bool draws = std::any_of(rows.begin() + r0, rows.begin() + r0 + m,
                                   [](const RowSampling& r) { return r.active && r.rule.temperature > 0; });
    if (draws) {
      size_t bytes = sort_temp_bytes(m, V, offsets_.get());
      require(bytes <= sort_temp_.size(), "DeviceSampler", "the sort needs {} bytes of scratch, {} were set aside", bytes,
              sort_temp_.size());
      bytes = sort_temp_.size();
      NIBBLE_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
          sort_temp_.get(), bytes, logits + r0 * V, sorted_logits_.get(), iota_.get(), sorted_ids_.get(), int(m * V),
          int(m), offsets_.get(), offsets_.get() + 1, 0, 32, stream));
    }
    pick_kernel<<<unsigned(m), kThreads, chunk_bytes_, stream>>>(logits + r0 * V, V, rows_.get() + r0, penalized_.get(),
                                                       original_.get(), log_z_.get() + r0, sorted_logits_.get(),
                                                       sorted_ids_.get(), ids_.get() + r0, logprobs_.get() + r0);
    NIBBLE_CUDA_CHECK_LAUNCH();
  }
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(out.ids.data(), ids_.get(), size_t(n) * 4, cudaMemcpyDeviceToHost, stream));
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(out.logprobs.data(), logprobs_.get(), size_t(n) * 4, cudaMemcpyDeviceToHost, stream));
  if (top_n > 0) {
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(out.top_ids.data(), top_ids_.get(), out.top_ids.size() * 4,
                                      cudaMemcpyDeviceToHost, stream));
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(out.top_logprobs.data(), top_logprobs_.get(), out.top_logprobs.size() * 4,
                                      cudaMemcpyDeviceToHost, stream));
  }
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (size_t r = 0; r < rows.size(); ++r)
    if (!rows[r].active) out.ids[r] = -1;  // the device left them as they were
}

}  // namespace nibble::cuda
