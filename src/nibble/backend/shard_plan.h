// The shard plan of tensor parallelism (notes/tensor-parallel.md): which part of every weight rank
// r of a group of `world` ranks holds, and that part cut out of the whole model as a Model of its
// own (the rank's executor runs it; Model::set_tensor_parallel adds the collectives).
//   column-parallel (split along N): q/k/v (rank r's heads and their KV heads; with fewer KV heads
//     than ranks each KV head is copied to the ranks whose q heads read it), gate/up, the LM head
//     and the embedding (vocabulary slices);
//   row-parallel (split along K, one all-reduce after): o_proj and down_proj.
// A packed Atom linear splits along N by whole row groups (its input permutation stays whole) and
// along K by whole quantization groups of its permuted channels; the keepers (the last channels,
// one INT8 scale per token over all of them) stay whole on the last rank, so each rank quantizes
// its activations with exactly the scales the unsharded layer uses. down_proj's order is folded
// into gate/up's rows, so its K split is gate/up's N split. o_proj's permutation mixes the heads:
// its shard reads the whole attention output, all-gathered (one more collective per layer, any
// packed file serves at any degree), unless it has no permutation and the head boundaries are
// group boundaries.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "nibble/model/linear.h"
#include "nibble/model/model.h"

namespace nibble {

struct ChannelRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

class ShardPlan {
 public:
  // Throws nibble::Error naming the count and the layer that does not split `world` ways (heads,
  // KV heads, quantization groups, activation scales over a whole row, vocabulary).
  ShardPlan(const Model& model, int world);

  int world() const { return world_; }
  int64_t heads_per_rank() const { return heads_; }
  int64_t kv_heads_per_rank() const { return kv_heads_; }
  // Rows of the fused q/k/v rank r holds: its q rows, then its k rows, then its v rows.
  std::vector<ChannelRange> qkv_rows(int rank) const;
  // Rank r's permuted intermediate channels: gate rows, up rows (offset by intermediate_size) and
  // down_proj's input columns.
  ChannelRange intermediate(int rank) const { return {intermediate_[size_t(rank)], intermediate_[size_t(rank) + 1]}; }
  // o_proj's input columns of rank r: in its permuted channel order when gather_attention().
  ChannelRange o_columns(int rank) const { return {o_[size_t(rank)], o_[size_t(rank) + 1]}; }
  bool gather_attention() const { return gather_attention_; }
  ChannelRange vocab(int rank) const;
  int64_t vocab_per_rank() const { return vocab_per_rank_; }
  // What rank r's model passes to Model::set_tensor_parallel.
  TensorParallelRank placement(int rank, Communicator* comm) const;

 private:
  int world_;
  ModelConfig config_;
  int64_t heads_ = 0, kv_heads_ = 0, vocab_per_rank_ = 0;
  std::vector<int64_t> intermediate_, o_;  // world + 1 boundaries each
  bool gather_attention_ = false;
};

// Rank r's shard of `model`: its own config (heads, KV heads and intermediate size of the rank),
// copies of its parts of the weights, the model's KV format and activation rounding.
std::unique_ptr<Model> shard_model(const Model& model, const ShardPlan& plan, int rank);

// A row-parallel shard that reads chosen channels of a wider input: channel c of `inner`'s input
// is channel channels[c] of x (o_proj's permuted K range over the gathered attention output).
class ChannelSubsetLinear final : public Linear {
 public:
  ChannelSubsetLinear(int64_t in, std::vector<int32_t> channels, std::unique_ptr<Linear> inner);
  void forward(const float* x, int64_t rows, float* y) const override;
  int64_t storage_bytes() const override { return inner_->storage_bytes() + int64_t(channels_.size()) * 4; }
  const std::vector<int32_t>& channels() const { return channels_; }
  const Linear& inner() const { return *inner_; }

 private:
  std::vector<int32_t> channels_;
  std::unique_ptr<Linear> inner_;
};

}  // namespace nibble
