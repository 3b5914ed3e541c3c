#include "nibble/engine/scheduler.h"

#include <algorithm>

#include "nibble/core/error.h"

namespace nibble {

Scheduler::~Scheduler() {
  for (const auto& [id, s] : seqs_)
    if (s->kv >= 0) kv_.free(s->kv);
  for (const CachedPrefix& p : prefixes_) kv_.free(p.kv);
}

Scheduler::Scheduler(KVPool& kv, SchedulerOptions opt) : kv_(kv), opt_(opt) {
  check(opt.max_batch_tokens >= 1, "scheduler", "--max-batch-tokens must be >= 1, got {}", opt.max_batch_tokens);
}

void Scheduler::add(RequestId id, std::vector<int32_t> prompt, bool score_prompt) {
  auto s = std::make_unique<Sequence>();
  s->id = id;
  s->score_prompt = score_prompt;
  s->prompt_len = int64_t(prompt.size());
  s->tokens = std::move(prompt);
  waiting_.push_back(s.get());
  seqs_.emplace(id, std::move(s));
}

const std::vector<int32_t>& Scheduler::tokens(RequestId id) const { return seqs_.at(id)->tokens; }

int64_t Scheduler::pages_in_use() const {
  return (kv_.capacity_tokens() - kv_.free_tokens()) / kKVPageTokens;
}

bool Scheduler::evict_prefix() {
  if (prefixes_.empty()) return false;
  auto lru = std::min_element(prefixes_.begin(), prefixes_.end(),
                              [](const CachedPrefix& a, const CachedPrefix& b) { return a.last_used < b.last_used; });
  kv_.free(lru->kv);
  prefixes_.erase(lru);
  return true;
}

void Scheduler::preempt(Sequence& s) {
  kv_.free(s.kv);
  s.kv = -1;
  s.cached = 0;
  running_.erase(std::find(running_.begin(), running_.end(), &s));
  waiting_.push_front(&s);
  ++stats_.preemptions;
}

bool Scheduler::make_room(Sequence& s, int64_t n) {
  while (!kv_.reserve(s.kv, n)) {
    if (evict_prefix()) continue;
    Sequence& victim = *running_.back();
    preempt(victim);
    if (&victim == &s) return false;
  }
  return true;
}

void Scheduler::attach(Sequence& s) {
  // The longest cached run of whole pages s starts with, leaving at least its last token to compute.
  const CachedPrefix* best = nullptr;
  int64_t best_len = 0;
  if (opt_.prefix_caching && !s.score_prompt)
    for (const CachedPrefix& p : prefixes_) {
      const int64_t limit = std::min<int64_t>(int64_t(p.tokens.size()), int64_t(s.tokens.size()) - 1);
      const int64_t same = std::mismatch(p.tokens.begin(), p.tokens.begin() + std::max<int64_t>(limit, 0),
                                         s.tokens.begin()).first - p.tokens.begin();
      const int64_t len = same / kKVPageTokens * kKVPageTokens;
      if (len > best_len) best = &p, best_len = len;
    }
  // A fork copies the cache on the CPU: only when the pool has the room.
  if (best && int64_t(best->tokens.size()) <= kv_.free_tokens()) {
    s.kv = kv_.fork(best->kv);
    kv_.truncate(s.kv, best_len);
    s.cached = best_len;
    stats_.prefix_hit_tokens += best_len;
    const_cast<CachedPrefix*>(best)->last_used = ++tick_;
  } else {
    s.kv = kv_.add();
  }
}

void Scheduler::cache_prefix(const Sequence& s, int64_t n, bool fork) {
  n = n / kKVPageTokens * kKVPageTokens;
  const bool known = std::any_of(prefixes_.begin(), prefixes_.end(), [&](const CachedPrefix& p) {
    return int64_t(p.tokens.size()) == n && std::equal(p.tokens.begin(), p.tokens.end(), s.tokens.begin());
  });
  const int64_t copy = (kv_.length(s.kv) + kKVPageTokens - 1) / kKVPageTokens * kKVPageTokens;  // a CPU fork's
  if (!opt_.prefix_caching || n == 0 || known || (fork && copy > kv_.free_tokens())) {
    if (!fork) kv_.free(s.kv);
    return;
  }
  if (int64_t(prefixes_.size()) >= opt_.max_cached_prefixes) evict_prefix();
  const SeqId kv = fork ? kv_.fork(s.kv) : s.kv;
  kv_.truncate(kv, n);
  prefixes_.push_back({std::vector<int32_t>(s.tokens.begin(), s.tokens.begin() + n), kv, ++tick_});
}

Scheduler::Step Scheduler::schedule() {
  Step step;
  int64_t budget = opt_.max_batch_tokens;
  auto plan = [&](Sequence& s, int64_t n) {
    step.batch.push_back({s.kv, std::span(s.tokens).subspan(size_t(s.cached), size_t(n)),
                          s.score_prompt && s.cached < s.prompt_len});
    step.requests.push_back(s.id);
    step.samples.push_back(s.cached + n == int64_t(s.tokens.size()));
    step.starts.push_back(s.cached);
    budget -= n;
  };
  // Running sequences, oldest first: a preemption only ever takes one not planned yet.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence& s = *running_[i];
    const int64_t n = std::min<int64_t>(int64_t(s.tokens.size()) - s.cached, budget);
    if (!make_room(s, n)) break;  // s was the newest: nothing after it
    plan(s, n);
    ++i;
  }
  // Then waiting ones while the pool has room without preempting (a sequence preempted in this
  // step waits for the next one).
  const int64_t preempted = stats_.preemptions;
  while (budget > 0 && !waiting_.empty() && stats_.preemptions == preempted) {
    Sequence& s = *waiting_.front();
    attach(s);
    const int64_t n = std::min<int64_t>(int64_t(s.tokens.size()) - s.cached, budget);
    bool room;
    while (!(room = kv_.reserve(s.kv, n)) && evict_prefix()) {
    }
    if (!room) {
      if (s.cached > 0) stats_.prefix_hit_tokens -= s.cached;
      kv_.free(s.kv);
      s.kv = -1;
      s.cached = 0;
      break;
    }
    waiting_.pop_front();
    s.admitted = ++tick_;
    running_.push_back(&s);
    plan(s, n);
  }
  stats_.peak_pages = std::max(stats_.peak_pages, pages_in_use());
  return step;
}

void Scheduler::update(const Step& step, std::span<const int32_t> sampled) {
  size_t next = 0;
  for (size_t i = 0; i < step.batch.size(); ++i) {
    Sequence& s = *seqs_.at(step.requests[i]);
    s.cached += int64_t(step.batch[i].tokens.size());
    stats_.computed_tokens += int64_t(step.batch[i].tokens.size());
    if (!s.prompt_cached && s.cached >= s.prompt_len) {
      s.prompt_cached = true;
      cache_prefix(s, s.prompt_len, /*fork=*/true);
    }
    if (step.samples[i]) s.tokens.push_back(sampled[next++]);
  }
  check(next == sampled.size(), "scheduler", "{} tokens sampled for {} sequences", sampled.size(), next);
}

void Scheduler::finish(RequestId id) {
  auto it = seqs_.find(id);
  check(it != seqs_.end(), "engine", "no request {}", id);
  Sequence& s = *it->second;
  if (s.kv >= 0) {
    running_.erase(std::find(running_.begin(), running_.end(), &s));
    cache_prefix(s, s.cached, /*fork=*/false);
  } else {
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &s));
  }
  seqs_.erase(it);
}

}  // namespace nibble
