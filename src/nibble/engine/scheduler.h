// Continuous batching over the KV pool: every step, the next tokens of every running sequence
// (one to decode, or a chunk of a prompt) and of newly admitted ones, up to a token budget, with
// the room for each reserved before the step runs. When the pool runs out the most recently
// admitted sequence is preempted: its pages are freed and it is recomputed later (the CPU
// backend's batch invariance makes the recomputation give the same tokens). Full pages of prompts
// and of finished sequences stay cached for later requests that start with the same tokens.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "nibble/backend/backend.h"
#include "nibble/engine/request.h"

namespace nibble {

struct SchedulerOptions {
  int64_t max_batch_tokens = 4096;  // tokens one step may carry
  bool prefix_caching = true;
  // Cached prefixes kept at most (each is a pool sequence; on the CPU a copy of the cache, and an
  // unbounded CPU pool would otherwise never evict them).
  int64_t max_cached_prefixes = 64;
};

struct SchedulerStats {
  int64_t preemptions = 0;
  int64_t prefix_hit_tokens = 0;  // prompt tokens taken from the prefix cache instead of computed
  int64_t computed_tokens = 0;    // tokens run through the model (prefill, recomputation, decode)
  int64_t peak_pages = 0;         // most pages in use at once, prefix cache included
};

class Scheduler {
 public:
  Scheduler(KVPool& kv, SchedulerOptions opt);
  // Gives every pool sequence it holds (running requests, cached prefixes) back to the pool, so the
  // executor can serve another engine (a load sweep, a restarted server).
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // score_prompt: every prompt token is computed (no cached prefix) with its own row of logits.
  void add(RequestId id, std::vector<int32_t> prompt, bool score_prompt = false);
  // This step's entries (tokens point into the scheduler's sequences: valid until update), with
  // room reserved for each, and which of them reach their sequence's last token: those get a new one.
  // An entry of a score_prompt sequence that holds prompt tokens asks for all_logits.
  struct Step {
    std::vector<BatchEntry> batch;
    std::vector<RequestId> requests;
    std::vector<bool> samples;
    std::vector<int64_t> starts;  // the position of each entry's first token in its sequence
  };
  Step schedule();
  // After the step ran: the entries' tokens are cached; `sampled` holds one token for each entry
  // whose `samples` is set, in order.
  void update(const Step& step, std::span<const int32_t> sampled);
  // Drops a request (finished or aborted): its pages go to the prefix cache or back to the pool.
  void finish(RequestId id);

  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  const std::vector<int32_t>& tokens(RequestId id) const;
  const SchedulerStats& stats() const { return stats_; }
  int64_t pages_in_use() const;

 private:
  struct Sequence {
    RequestId id;
    std::vector<int32_t> tokens;  // the prompt, then what was generated
    int64_t prompt_len = 0;
    SeqId kv = -1;                // the pool's sequence while running
    int64_t cached = 0;           // tokens in the pool
    uint64_t admitted = 0;        // admission tick: the highest is preempted first
    bool prompt_cached = false;   // its prompt's full pages went into the prefix cache
    bool score_prompt = false;
  };
  // A pool sequence holding whole pages of tokens for later requests to fork. On the GPU its pages
  // are reference counted by the pool: evicting it frees only those no running sequence shares.
  struct CachedPrefix {
    std::vector<int32_t> tokens;  // whole pages
    SeqId kv;
    uint64_t last_used;
  };

  // Reserves n tokens for s, evicting cached prefixes, then preempting the most recently admitted
  // sequences; false when s itself had to be preempted.
  bool make_room(Sequence& s, int64_t n);
  bool evict_prefix();  // least recently used; false when none
  void preempt(Sequence& s);
  // Starts s's pool sequence from the longest cached prefix of its tokens, or empty.
  void attach(Sequence& s);
  void cache_prefix(const Sequence& s, int64_t n, bool fork);

  KVPool& kv_;
  SchedulerOptions opt_;
  SchedulerStats stats_;
  std::map<RequestId, std::unique_ptr<Sequence>> seqs_;
  std::vector<Sequence*> running_;  // by admission, oldest first
  std::deque<Sequence*> waiting_;   // arrival order; preempted sequences go to the front
  std::vector<CachedPrefix> prefixes_;
  uint64_t tick_ = 0;
};

}  // namespace nibble
