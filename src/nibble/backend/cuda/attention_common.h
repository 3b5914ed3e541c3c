// What the attention kernels share: the per-step batch metadata on the device (block tables,
// lengths, token positions, prefill tiles), the RoPE table, the decode workspace, and the
// arguments of the three entry points:
//
//   attention_append   new tokens' Q/K/V (fp16, straight from the fused QKV projection): RoPE on
//                      Q (and on K unless the cache stores K before RoPE), K/V written into the
//                      paged cache (quantized to INT4 on the fly for an INT4 cache), rotated Q out.
//   attention_prefill  causal GQA flash attention of the new tokens of a ragged batch against
//                      their whole cache (earlier chunks and the new tokens), online softmax.
//   attention_decode   one query token per sequence against its paged cache, flash-decoding
//                      split along the sequence, GQA heads sharing every K/V load.
//
// Step order (both prefill and decode): PagedKVCache::append for every sequence (the scheduler's
// out-of-pages check), AttentionBatchBuilder::build, attention_append, then prefill or decode.
#pragma once

#include <cuda_fp16.h>
#include <vector_types.h>

#include <cstdint>
#include <span>
#include <vector>

#include "nibble/backend/cuda/kv_cache_paged.h"

namespace nibble::cuda {

constexpr int kPrefillTileRows = 128;  // query rows (new tokens of one sequence) per prefill block

// Device metadata of one step. All pointers are device pointers into one buffer.
struct AttentionBatch {
  int batch = 0;        // sequences
  int num_tokens = 0;   // new tokens over all sequences
  int num_tiles = 0;    // prefill tiles (kPrefillTileRows new tokens of one sequence)
  int max_blocks = 0;   // block-table row length
  int max_seq_len = 0;  // max of seq_lens (host copy: plans splits)
  int max_new = 0;      // max new tokens of one sequence
  const int32_t* block_tables = nullptr;  // [batch][max_blocks]
  const int32_t* seq_lens = nullptr;      // [batch] tokens cached after this step (incl. the new)
  const int32_t* cu_new = nullptr;        // [batch + 1] prefix sums of new tokens
  const int32_t* token_seq = nullptr;     // [num_tokens] the sequence (batch row) of each new token
  const int32_t* token_pos = nullptr;     // [num_tokens] its position
  const int2* tiles = nullptr;            // [num_tiles] (sequence, first new token), longest first
};

// Builds AttentionBatch from the allocator's block tables into one device buffer, through one
// pinned host staging buffer. The sequences must already hold their new tokens (append).
class AttentionBatchBuilder {
 public:
  // Grows its buffers as batches need (tests, kernel benchmarks).
  AttentionBatchBuilder() = default;
  // Sized once for steps of up to max_seqs sequences, max_tokens new tokens and max_blocks pages
  // per sequence: build() then never allocates, and lays out a batch of the same sizes at the
  // same device addresses every time (block tables max_blocks wide), so a captured decode step
  // replays on the metadata of the next step.
  AttentionBatchBuilder(int max_seqs, int64_t max_tokens, int max_blocks);
  ~AttentionBatchBuilder();
  AttentionBatchBuilder(const AttentionBatchBuilder&) = delete;
  AttentionBatchBuilder& operator=(const AttentionBatchBuilder&) = delete;

  // new_tokens[i]: tokens sequence seqs[i] appended this step (1 for decode). The upload is queued
  // on `stream`; the host staging must not be rebuilt before it has run (the next build).
  // pad_to > seqs.size(): decode rows up to pad_to are padding, one token at position 0 of
  // `pad_page` each (a page no sequence uses: PageAllocator::set_aside_page).
  AttentionBatch build(const PageAllocator& alloc, std::span<const SeqId> seqs, std::span<const int> new_tokens,
                       Stream stream, int pad_to = 0, int32_t pad_page = -1);

 private:
  void ensure(size_t words);  // host and device buffers of at least `words` int32 (grows them)

  bool fixed_ = false;
  int fixed_blocks_ = 0;
  int32_t* host_ = nullptr;  // pinned
  void* device_ = nullptr;
  size_t capacity_ = 0;  // int32 words of each buffer
};

// cos/sin of every (position, frequency) in fp32, computed in float64 exactly as cpu::apply_rope
// does (angle = pos · inv_freq[i] in double, then float(cos), float(sin)). inv_freq comes from
// cpu::rope_inv_freq(config), llama3 scaling included.
class RopeTable {
 public:
  RopeTable(std::span<const double> inv_freq, int max_positions);
  ~RopeTable();
  RopeTable(const RopeTable&) = delete;
  RopeTable& operator=(const RopeTable&) = delete;
  const float2* data() const { return table_; }  // [max_positions][head_dim / 2] (cos, sin)
  int max_positions() const { return max_positions_; }
  int half_dim() const { return half_dim_; }

 private:
  float2* table_ = nullptr;
  int max_positions_ = 0, half_dim_ = 0;
};

// Device scratch for the decode splits' partial results: grows on demand, or reserved once at
// start (reserve) so that a captured step never allocates. Allocated zeroed (attention_decode
// keeps counters in it that it leaves at zero).
class AttentionWorkspace {
 public:
  AttentionWorkspace() = default;
  ~AttentionWorkspace();
  AttentionWorkspace(const AttentionWorkspace&) = delete;
  AttentionWorkspace& operator=(const AttentionWorkspace&) = delete;
  void* get(size_t bytes);
  void reserve(size_t bytes) { get(bytes); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct AppendArgs {
  const __half* qkv = nullptr;  // [num_tokens][qkv_stride]: Q (num_heads·D), K (kv_heads·D), V
  int64_t qkv_stride = 0;       // elements from one token's row to the next
  int num_heads = 0;
  int layer = 0;
  const RopeTable* rope = nullptr;  // null: no RoPE
  bool k_before_rope = false;       // store K unrotated (Atom's order); the readers rotate it
  float clip = 1.0f;                // INT4 cache: clip ratio of each token-and-head group
  // Store K and V in a Walsh-Hadamard-rotated basis (KVFormat::hadamard) and rotate Q the same way,
  // so scores are unchanged; the attention output is then in the rotated basis too (rotate it
  // back with hadamard_heads). Needs K after RoPE.
  bool hadamard = false;
  __half* q_out = nullptr;          // [num_tokens][num_heads][D], rotated
};

// Which prefill kernel runs. Auto: Wgmma where it applies (head dim 128, K stored after RoPE), else
// MmaSync; the tests and the bench force each. WgmmaPingPong: Wgmma with the two consumer
// warpgroups taking turns to issue their GEMMs (FlashAttention-3's ping-pong), where Wgmma applies.
enum class PrefillPath : uint8_t { Auto, MmaSync, Wgmma, WgmmaPingPong };
const char* prefill_path_name(PrefillPath p);
// Whether PrefillPath::Wgmma covers this cache and argument set.
bool prefill_wgmma_applies(const KVCacheView& cache, bool k_before_rope);

struct AttentionArgs {
  const __half* q = nullptr;  // [num_tokens][num_heads][D], rotated (attention_append's q_out)
  __half* out = nullptr;      // [num_tokens][num_heads][D]
  int num_heads = 0;
  int layer = 0;
  const RopeTable* rope = nullptr;  // needed when k_before_rope
  bool k_before_rope = false;
  float softmax_scale = 0;  // 0: 1/sqrt(D)
  int num_splits = 0;       // decode only: 0 = planned from the batch and the GPU, else forced (1..256)
  PrefillPath prefill_path = PrefillPath::Auto;  // prefill only
};

void attention_append(const KVCacheView& cache, const AttentionBatch& batch, const AppendArgs& args, Stream stream);
void attention_prefill(const KVCacheView& cache, const AttentionBatch& batch, const AttentionArgs& args,
                       Stream stream);
void attention_decode(const KVCacheView& cache, const AttentionBatch& batch, const AttentionArgs& args,
                      AttentionWorkspace& ws, Stream stream);

// The split count attention_decode plans for a batch (attention_plan.h's cost model; the executor
// fixes it per captured step; the bench prints it).
int attention_decode_splits(const KVCacheView& cache, const AttentionBatch& batch, int num_heads,
                            bool k_before_rope = false);
// Workspace bytes attention_decode may ask for with planned splits, whatever the batch.
size_t attention_decode_workspace_bytes(const KVCacheView& cache, int num_heads, bool k_before_rope);

}  // namespace nibble::cuda
