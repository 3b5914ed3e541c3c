#include "nibble/backend/cpu/executor.h"

#include <algorithm>

#include "nibble/core/error.h"

namespace nibble::cpu {

KVCachePool::KVCachePool(const Model& model, int64_t max_context, int64_t max_tokens)
    : model_(model), max_context_(max_context), max_tokens_(max_tokens) {}

SeqId KVCachePool::insert(std::unique_ptr<KVCache> cache) {
  auto slot = std::find(caches_.begin(), caches_.end(), nullptr);
  if (slot != caches_.end()) {
    *slot = std::move(cache);
    return SeqId(slot - caches_.begin());
  }
  caches_.push_back(std::move(cache));
  return SeqId(caches_.size() - 1);
}

KVCache& KVCachePool::cache(SeqId seq) const {
  check(seq >= 0 && size_t(seq) < caches_.size() && caches_[size_t(seq)], "kv pool", "no live sequence {}", seq);
  return *caches_[size_t(seq)];
}

SeqId KVCachePool::add() { return insert(model_.new_cache(max_context_)); }
SeqId KVCachePool::fork(SeqId seq) { return insert(cache(seq).clone()); }
void KVCachePool::truncate(SeqId seq, int64_t n) { cache(seq).truncate(n); }
void KVCachePool::free(SeqId seq) {
  cache(seq);  // validates
  caches_[size_t(seq)].reset();
}

int64_t KVCachePool::free_tokens() const {
  int64_t used = 0;
  for (const auto& c : caches_)
    if (c) used += c->length();
  return std::max<int64_t>(0, max_tokens_ - used);
}

CpuExecutor::CpuExecutor(Model& model, const RuntimeOptions& opt)
    : model_(model),
      pool_(model, opt.max_context > 0 ? opt.max_context : model.config().max_position_embeddings,
            // --kv-pages bounds the pool as on the GPU (pages of 16 tokens); else only memory does.
            opt.kv_pages > 0 ? opt.kv_pages * 16 : int64_t(1) << 40) {}

void CpuExecutor::forward(std::span<const BatchEntry> batch, std::vector<float>& logits) {
  std::vector<Step> steps;
  steps.reserve(batch.size());
  for (const BatchEntry& e : batch) steps.push_back({&pool_.cache(e.seq), e.tokens, e.all_logits});
  logits = model_.forward(steps);
}

void CpuExecutor::forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) {
  std::vector<float> logits;
  forward(batch, logits);
  const int64_t V = model_.config().vocab_size;
  ids.resize(logits.size() / size_t(V));
  for (size_t r = 0; r < ids.size(); ++r) {
    const float* row = logits.data() + r * size_t(V);
    ids[r] = int32_t(std::max_element(row, row + V) - row);
  }
}

}  // namespace nibble::cpu
