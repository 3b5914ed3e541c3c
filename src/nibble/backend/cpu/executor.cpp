#include "nibble/backend/cpu/executor.h"

#include <algorithm>

#include "nibble/core/error.h"

namespace nibble::cpu {

KVCachePool::KVCachePool(const Model& model, int64_t max_context, int64_t max_tokens)
    : model_(model), max_context_(max_context), max_tokens_(max_tokens) {}

SeqId KVCachePool::insert(std::unique_ptr<KVCache> cache) {
  const int64_t pages = (cache->length() + kKVPageTokens - 1) / kKVPageTokens;
  check(pages * kKVPageTokens <= free_tokens(), "kv pool", "no room for a copy of {} tokens ({} free)",
        cache->length(), free_tokens());
  auto slot = std::find(caches_.begin(), caches_.end(), nullptr);
  if (slot == caches_.end()) {
    caches_.push_back(nullptr);
    reserved_.push_back(0);
    slot = caches_.end() - 1;
  }
  *slot = std::move(cache);
  const size_t id = size_t(slot - caches_.begin());
  reserved_[id] = 0;
  return SeqId(id);
}

KVCache& KVCachePool::cache(SeqId seq) const {
  check(seq >= 0 && size_t(seq) < caches_.size() && caches_[size_t(seq)], "kv pool", "no live sequence {}", seq);
  return *caches_[size_t(seq)];
}

int64_t KVCachePool::held_tokens(size_t seq, int64_t grow) const {
  const int64_t reach = std::max(caches_[seq]->length() + grow, reserved_[seq]);
  return (reach + kKVPageTokens - 1) / kKVPageTokens * kKVPageTokens;
}

SeqId KVCachePool::add() { return insert(model_.new_cache(max_context_)); }
SeqId KVCachePool::fork(SeqId seq) { return insert(cache(seq).clone()); }

bool KVCachePool::reserve(SeqId seq, int64_t n_new) {
  check(n_new >= 0, "kv pool", "reserve of {} tokens", n_new);
  const int64_t extra = held_tokens(size_t(seq), n_new) - held_tokens(size_t(seq));
  if (cache(seq).length() + n_new > max_context_ || extra > free_tokens()) return false;
  reserved_[size_t(seq)] = std::max(reserved_[size_t(seq)], cache(seq).length() + n_new);
  return true;
}

void KVCachePool::truncate(SeqId seq, int64_t n) {
  cache(seq).truncate(n);
  reserved_[size_t(seq)] = 0;
}

void KVCachePool::free(SeqId seq) {
  cache(seq);  // validates
  caches_[size_t(seq)].reset();
}

int64_t KVCachePool::free_tokens() const {
  int64_t held = 0;
  for (size_t i = 0; i < caches_.size(); ++i)
    if (caches_[i]) held += held_tokens(i);
  return max_tokens_ - held;
}

void KVCachePool::check_room(std::span<const SeqId> seqs, std::span<const int64_t> new_tokens) const {
  int64_t extra = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    cache(seqs[i]);  // validates
    extra += held_tokens(size_t(seqs[i]), new_tokens[i]) - held_tokens(size_t(seqs[i]));
  }
  check(extra <= free_tokens(), "kv pool", "the KV pool is full: the step needs {} more tokens of room, {} are free",
        extra, free_tokens());
}

CpuExecutor::CpuExecutor(Model& model, const RuntimeOptions& opt)
    : model_(model),
      pool_(model, opt.max_context > 0 ? opt.max_context : model.config().max_position_embeddings,
            // --kv-pages bounds the pool as on the GPU (pages of 16 tokens); else only memory does.
            opt.kv_pages > 0 ? opt.kv_pages * kKVPageTokens : kUnboundedKVTokens) {}

void CpuExecutor::forward(std::span<const BatchEntry> batch, std::vector<float>& logits) {
  std::vector<Step> steps;
  std::vector<SeqId> seqs;
  std::vector<int64_t> news;
  for (const BatchEntry& e : batch) {
    steps.push_back({&pool_.cache(e.seq), e.tokens, e.all_logits});
    seqs.push_back(e.seq);
    news.push_back(int64_t(e.tokens.size()));
  }
  pool_.check_room(seqs, news);
  logits = model_.forward(steps);
}

}  // namespace nibble::cpu
