// The CPU backend: today's reference forward pass (Model::forward) behind the Executor seam, with a
// KV pool of per-sequence caches in the model's KV format.
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
  void truncate(SeqId seq, int64_t n) override;
  void free(SeqId seq) override;
  int64_t length(SeqId seq) const override { return cache(seq).length(); }
  int64_t capacity_tokens() const override { return max_tokens_; }
  int64_t free_tokens() const override;

  KVCache& cache(SeqId seq) const;
  int64_t max_context() const { return max_context_; }

 private:
  SeqId insert(std::unique_ptr<KVCache> cache);

  const Model& model_;
  int64_t max_context_, max_tokens_;
  std::vector<std::unique_ptr<KVCache>> caches_;  // indexed by SeqId; null = free id
};

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(Model& model, const RuntimeOptions& opt);
  const ModelConfig& config() const override { return model_.config(); }
  KVPool& kv() override { return pool_; }
  std::string device_name() const override { return "cpu"; }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override;
  void forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) override;

 private:
  Model& model_;
  KVCachePool pool_;
};

}  // namespace nibble::cpu
