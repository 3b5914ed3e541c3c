// A request to the engine: prompt ids, how to sample, when to stop, and where its output goes.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace nibble {

using RequestId = int64_t;

struct SamplingParams {
  float temperature = 0.0f;         // 0 = greedy (argmax)
  int top_k = 0;                    // 0 = all tokens
  float top_p = 1.0f;               // 1 = no nucleus cut
  float min_p = 0.0f;               // drop tokens less likely than min_p times the most likely
  float repetition_penalty = 1.0f;  // > 1 discourages tokens of the prompt and output (CTRL's rule)
  float presence_penalty = 0.0f;    // subtracted from the logit of every token already generated
  float frequency_penalty = 0.0f;   // subtracted once per time a token was generated
  uint64_t seed = 0;                // each request draws from its own generator
  int logprobs = 0;                 // also report the n most likely tokens at each step
  // Throws nibble::Error("request", ...) naming the field out of range.
  void validate() const;
};

struct StopConditions {
  int64_t max_tokens = 16;                // tokens to generate; -1 = until the context is full
  std::vector<int32_t> stop_ids = {};     // generating one of these ends the request
  std::vector<std::string> stop_strings = {};  // matched on the decoded text; never streamed, not even in part
  bool ignore_eos = false;                // keep going past the tokenizer's end-of-sequence ids
};

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  StopConditions stop;
  // The first event also scores the prompt (OutputEvent::prompt): every prompt token is computed,
  // none taken from the prefix cache.
  bool prompt_logprobs = false;
};

enum class FinishReason { None, Length, Stop, Abort };
const char* finish_reason_name(FinishReason r);

struct TokenLogprob {
  int32_t id = -1;
  float logprob = 0;  // log-probability under the model's distribution (before penalties, temperature)
};

// A token's logprob and the SamplingParams::logprobs most likely tokens at its position, most likely first.
struct SampledToken {
  TokenLogprob token;  // logprob NaN when the step took the executor's greedy ids (Sampler::plain_greedy)
  std::vector<TokenLogprob> top;
};

// What a request produces, one event per generated token. `text` is the text that token makes
// final (empty without a tokenizer); the last event has `finish` set (an aborted request's last
// event carries no token).
struct OutputEvent {
  RequestId request = -1;
  TokenLogprob token;
  std::vector<TokenLogprob> top;  // SamplingParams::logprobs most likely, most likely first
  std::string text;
  FinishReason finish = FinishReason::None;
  // First event of a Request::prompt_logprobs request: each prompt token given the ones before it
  // (the first has no context: NaN logprob, no top).
  std::vector<SampledToken> prompt;
};
using TokenSink = std::function<void(const OutputEvent&)>;

}  // namespace nibble
