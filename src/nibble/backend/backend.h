// What a backend provides (DESIGN.md, "The seams"): an Executor holds one model resident on one
// device and runs a ragged batch of sequences, prefill and decode mixed; its KVPool is the one
// memory every sequence's cache lives in. The CPU backend is the reference; the CUDA backend runs
// the formats that have kernels and refuses the others by name at construction.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "nibble/model/config.h"

namespace nibble {

class Model;
struct Layer;
enum class LinearSlot;
struct RowSampling;  // backend/sampling.h
struct SampledRows;
using SeqId = int32_t;

// One sequence's part of a step: `tokens` are appended after the sequence's cached ones.
// all_logits: a row of logits for every token (scoring), else only for the last (generation).
struct BatchEntry {
  SeqId seq = -1;
  std::span<const int32_t> tokens;
  bool all_logits = false;
};

// Both pools hand out room in pages of this many tokens (RuntimeOptions::kv_pages counts them).
inline constexpr int64_t kKVPageTokens = 16;
// capacity_tokens() of a pool without a bound (the CPU's without kv_pages): it grows in host memory.
inline constexpr int64_t kUnboundedKVTokens = int64_t(1) << 40;

class KVPool {
 public:
  virtual ~KVPool() = default;
  virtual SeqId add() = 0;                        // a new empty sequence
  virtual SeqId fork(SeqId seq) = 0;              // a new sequence sharing seq's tokens
  // Takes the room for n_new more tokens of seq now (pages, copy-on-write copies), so that the next
  // forward() appending up to n_new tokens to it cannot run out; reservations of several sequences
  // add up. False, changing nothing, when the pool cannot: the scheduler's cue to preempt.
  // truncate and free give a reservation back.
  [[nodiscard]] virtual bool reserve(SeqId seq, int64_t n_new) = 0;
  virtual void truncate(SeqId seq, int64_t n) = 0;  // forget positions n.. of seq
  virtual void free(SeqId seq) = 0;
  virtual int64_t length(SeqId seq) const = 0;    // tokens cached
  virtual int64_t capacity_tokens() const = 0;    // tokens the whole pool holds
  virtual int64_t free_tokens() const = 0;        // tokens it can still take (reservations taken)
};

struct RuntimeOptions {
  std::string device = "cpu";  // "cpu" or "cuda"
  int64_t max_batch_tokens = 4096;  // tokens one forward() may carry (sizes the device buffers)
  int64_t max_context = 0;          // longest sequence; 0 = the model's max_position_embeddings
  int64_t kv_pages = 0;             // pages of kKVPageTokens in the KV pool; 0 = cuda: from memory, cpu: unbounded
  double gpu_mem_fraction = 0.9;    // cuda: share of the free device memory the KV pool may take
  double gpu_mem_gb = 0;            // cuda: cap on all nibble allocates on the device (GB); 0 = none
  bool cuda_graphs = true;          // cuda: replay decode steps as CUDA graphs (false: launch every kernel)
  int tp = 1;                       // ranks of tensor parallelism (backend/tensor_parallel.h); 1: one executor
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const ModelConfig& config() const = 0;
  virtual KVPool& kv() = 0;
  virtual std::string device_name() const = 0;
  // Appends each entry's tokens to its sequence and writes logits [rows, vocab] in batch order:
  // one row per token of an all_logits entry, one otherwise. Throws nibble::Error on bad input
  // (unknown sequence, token outside the vocabulary, past the context) and when the pool is full;
  // then no sequence has changed.
  virtual void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) = 0;
  // forward, returning only the greedy token of each logits row (the first maximum, as the greedy
  // sampler picks). A device backend finds them where the logits are, so one id per row crosses to
  // the host, not a row; this default runs forward and scans the rows.
  virtual void forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids);
  // forward, then row r of the logits sampled by rows[r] (backend/sampling.h; one per logits row,
  // inactive rows skipped) where the logits are: only ids and logprobs cross to the host. This
  // default runs forward and samples on the host.
  virtual void forward_sample(std::span<const BatchEntry> batch, std::span<const RowSampling> rows, SampledRows& out);
};

// The executor for opt.device. `model` must outlive a CPU executor (it runs on the model's
// weights); a CUDA executor copies what it needs to the device.
std::unique_ptr<Executor> make_executor(Model& model, const RuntimeOptions& opt);

// One linear's input rows where a device backend holds them: fp16 [rows, dim] in device memory,
// valid for work queued on `stream` (the backend's cudaStream_t) until the layer's next kernel.
struct DeviceRows {
  const void* data = nullptr;
  int64_t rows = 0, dim = 0;
  void* stream = nullptr;
};
// Sees the input of every linear of the layer a LayerStream runs (calibration statistics), in the
// model's channel order, as Model's LinearObserver does on the host. `expert` is -1 outside a MoE.
using DeviceLinearObserver = std::function<void(LinearSlot slot, int expert, const DeviceRows& x)>;

// The hidden states of the calibration windows (`windows` sequences of `ctx` tokens, positions
// 0..ctx-1) resident on a device, moved through one decoder layer at a time: Model::run_layer and
// observe_layer for `nibble quantize --device cuda`, on the executor's kernels. The layer's weights
// are read from the model as they are at each call (full precision for the statistics, quantized
// for the pass feeding the next layer), in the model's KV format and with the fp32 residual stream
// of the CUDA executor.
class LayerStream {
 public:
  virtual ~LayerStream() = default;
  virtual void set_window(int64_t w, const float* hidden) = 0;  // [ctx, hidden_size] from the host
  virtual void read_window(int64_t w, float* hidden) const = 0;  // to the host
  // Uploads model.layers()[l] as it is now, in the model's KV format; throws nibble::Error, naming
  // the linear, for a format without a kernel (the stream is unchanged and usable then).
  virtual void load_layer(const Model& model, int l) = 0;
  // Runs the loaded layer over every window: advance replaces the stream by the layer's output;
  // otherwise only `observer` sees the linear inputs (down_proj's product skipped, stream unchanged).
  virtual void run(bool advance, const DeviceLinearObserver& observer) = 0;
};
// Throws nibble::Error when the model has no CUDA layer kernels (architecture, head_dim) or the
// stream does not fit the device's free memory.
std::unique_ptr<LayerStream> make_cuda_layer_stream(const ModelConfig& c, int64_t windows, int64_t ctx);

// Whether a CUDA device can be used; when not, *why says why (no CUDA build, no driver, no GPU).
bool cuda_device_available(std::string* why);
// Throws nibble::Error naming what layer l carries that the CUDA kernels do not run (a learned K
// rotation after RoPE); checked on the host before any device is touched.
void check_cuda_layer_support(const Layer& layer, int l);

}  // namespace nibble
