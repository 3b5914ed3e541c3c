// The engine: requests in, tokens out, over any Executor (the CPU and the CUDA backend alike).
// Each step() runs one batch the scheduler plans, samples the sequences that reached their last
// token, and streams each request's events to its sink, stop strings held back until they can
// no longer match.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "nibble/backend/backend.h"
#include "nibble/engine/request.h"
#include "nibble/engine/sampler.h"
#include "nibble/engine/scheduler.h"
#include "nibble/tokenizer/tokenizer.h"

namespace nibble {

struct EngineOptions {
  int64_t max_batch_tokens = 4096;  // at most the executor's RuntimeOptions::max_batch_tokens
  int64_t max_context = 0;          // longest sequence; 0 = the model's max_position_embeddings
  bool prefix_caching = true;
  // Tokens that end generation unless a request ignores EOS; empty = the tokenizer's (a model's
  // generation_config.json may name more).
  std::vector<int32_t> eos_ids = {};
};

// Where the engine's steps spent their wall time (nibble bench reports it): planning, the executor
// (host preparation, the device's work, sampling where the executor samples, and the copy back of
// ids or logits), and the host's sampling (when it samples), streaming and bookkeeping after it.
struct EngineTimes {
  int64_t steps = 0;
  int64_t sequences = 0;  // summed over steps: sequences / steps is the mean batch
  double schedule_s = 0, forward_s = 0, after_s = 0;
};

class Engine {
 public:
  // `tokenizer` (may be null: no text, no stop strings) decodes the output and gives the EOS ids.
  Engine(Executor& exec, const Tokenizer* tokenizer, EngineOptions opt);

  // Queues a request. Throws nibble::Error("request", reason) for one that can never run: an empty
  // prompt, an id outside the vocabulary, bad sampling parameters, or a prompt plus max_tokens past
  // the context or the whole KV pool.
  RequestId submit(Request request, TokenSink sink);
  // Ends a request now: its pages are freed (whole pages of its tokens may stay in the prefix cache,
  // the first evicted when room is needed); its sink gets a last event with FinishReason::Abort.
  void abort(RequestId id);
  // Runs one step; false when there was nothing to run.
  bool step();
  // Steps until every request has finished.
  void run();

  const SchedulerStats& stats() const { return scheduler_.stats(); }
  const EngineTimes& times() const { return times_; }
  int64_t pages_in_use() const { return scheduler_.pages_in_use(); }
  Executor& executor() { return exec_; }

 private:
  struct Output {
    TokenSink sink;
    Sampler sampler;
    int64_t prompt_len, max_tokens;
    StopConditions stop;
    std::optional<StreamDecoder> decoder;
    std::string pending;  // decoded text held back: it may begin a stop string
    // Request::prompt_logprobs: the prompt's scores (top n as the sampler's logprobs), filled as
    // the prompt is computed and sent with the first event.
    std::vector<SampledToken> prompt_scores;
    int prompt_top = 0;
  };
  // Scores the prompt tokens that `n` rows of logits predict, the first row at position `start`.
  void score_prompt(RequestId id, int64_t start, const float* rows, int64_t n);
  // Streams one sampled token of a request; true when that ends the request.
  bool emit(RequestId id, Output& out, const SampledToken& t);
  void end(RequestId id, Output& out, OutputEvent last);

  Executor& exec_;
  const Tokenizer* tokenizer_;
  EngineOptions opt_;
  Scheduler scheduler_;
  std::vector<int32_t> eos_;
  std::map<RequestId, Output> outputs_;
  RequestId next_id_ = 0;
  std::vector<float> logits_;  // a step that scores prompts takes its rows to the host
  SampledRows step_rows_;
  std::vector<int32_t> greedy_ids_;
  EngineTimes times_;
};

}  // namespace nibble
