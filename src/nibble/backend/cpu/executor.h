// The CPU backend: today's reference forward pass (Model::forward) behind the Executor seam, with a
// KV pool of per-sequence caches in the model's KV format. The pool counts room as the GPU's does,
// in whole pages of kKVPageTokens per sequence (a fork copies its parent's cache, so it takes pages).
#pragma once

#include <memory>
#include <vector>

#include "nibble/backend/backend.h"
#include "nibble/model/model.h"

namespace nibble::cpu {

class KVCachePool final : public KVPool {
 public:
  // Every sequence may grow to `max_context` tokens; the pool holds at most `max_tokens` in all.
  KVCachePool(const Model& model, int64_t max_context, int64_t max_tokens);

  SeqId add() override;
  SeqId fork(SeqId seq) override;
  [[nodiscard]] bool reserve(SeqId seq, int64_t n_new) override;
  void truncate(SeqId seq, int64_t n) override;
  void free(SeqId seq) override;
  int64_t length(SeqId seq) const override { return cache(seq).length(); }
  int64_t capacity_tokens() const override { return max_tokens_; }
  int64_t free_tokens() const override;

  KVCache& cache(SeqId seq) const;
  int64_t max_context() const { return max_context_; }
  // Throws nibble::Error, changing nothing, when appending new_tokens[i] tokens to seqs[i] overflows
  // the pool (room reserved for a sequence is its own).
  void check_room(std::span<const SeqId> seqs, std::span<const int64_t> new_tokens) const;

 private:
  SeqId insert(std::unique_ptr<KVCache> cache);
  // Tokens of room seq holds: its length or its reservation, rounded up to whole pages.
  int64_t held_tokens(size_t seq, int64_t grow = 0) const;

  const Model& model_;
  int64_t max_context_, max_tokens_;
  std::vector<std::unique_ptr<KVCache>> caches_;  // indexed by SeqId; null = free id
  std::vector<int64_t> reserved_;                 // per SeqId: length the reservation reaches
};

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(Model& model, const RuntimeOptions& opt);
  const ModelConfig& config() const override { return model_.config(); }
  KVPool& kv() override { return pool_; }
  std::string device_name() const override { return "cpu"; }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override;

 private:
  Model& model_;
  KVCachePool pool_;
};

}  // namespace nibble::cpu
