#include "nibble/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <limits>

#include "nibble/core/error.h"

namespace nibble {

Engine::Engine(Executor& exec, const Tokenizer* tokenizer, EngineOptions opt)
    : exec_(exec),
      tokenizer_(tokenizer),
      opt_(opt),
      scheduler_(exec.kv(), {opt.max_batch_tokens, opt.prefix_caching}) {
  if (opt_.max_context <= 0) opt_.max_context = exec.config().max_position_embeddings;
  eos_ = !opt_.eos_ids.empty() || !tokenizer ? opt_.eos_ids : tokenizer->eos_ids();
}

RequestId Engine::submit(Request r, TokenSink sink) {
  const int64_t vocab = exec_.config().vocab_size, prompt = int64_t(r.prompt.size());
  check(prompt > 0, "request", "the prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i)
    check(r.prompt[i] >= 0 && r.prompt[i] < vocab, "request", "prompt token {} at position {} is outside the vocabulary (0..{})",
          r.prompt[i], i, vocab - 1);
  r.sampling.validate();
  check(r.stop.max_tokens == -1 || r.stop.max_tokens >= 1, "request", "max_tokens must be >= 1 or -1, got {}",
        r.stop.max_tokens);
  check(prompt < opt_.max_context, "request", "the prompt has {} tokens, at or past the context of {}", prompt,
        opt_.max_context);
  const int64_t max_tokens = r.stop.max_tokens < 0 ? opt_.max_context - prompt + 1 : r.stop.max_tokens;
  // The last token generated is never fed back: the cache holds prompt + max_tokens - 1.
  const int64_t cached = prompt + max_tokens - 1;
  check(cached <= opt_.max_context, "request", "{} prompt tokens + {} to generate exceed the context of {}", prompt,
        max_tokens, opt_.max_context);
  const int64_t room = (cached + kKVPageTokens - 1) / kKVPageTokens * kKVPageTokens;
  check(room <= exec_.kv().capacity_tokens(), "request",
        "{} prompt tokens + {} to generate need {} pages, more than the whole KV pool of {}", prompt, max_tokens,
        room / kKVPageTokens, exec_.kv().capacity_tokens() / kKVPageTokens);
  for (const std::string& s : r.stop.stop_strings) check(!s.empty(), "request", "a stop string is empty");
  check(r.stop.stop_strings.empty() || tokenizer_, "request", "stop strings need a tokenizer");

  const RequestId id = next_id_++;
  Output& out = outputs_.emplace(id, Output{std::move(sink), Sampler(r.sampling, r.prompt), prompt, max_tokens,
                                            std::move(r.stop), std::nullopt, {}, {}, r.sampling.logprobs})
                    .first->second;
  if (tokenizer_) out.decoder.emplace(*tokenizer_, /*skip_special=*/false, /*continues_text=*/true);
  if (r.prompt_logprobs) {
    out.prompt_scores.resize(size_t(prompt));
    out.prompt_scores[0].token = {r.prompt[0], std::numeric_limits<float>::quiet_NaN()};
  }
  scheduler_.add(id, std::move(r.prompt), r.prompt_logprobs);
  return id;
}

void Engine::end(RequestId id, Output& out, OutputEvent last) {
  last.request = id;
  const TokenSink sink = std::move(out.sink);
  outputs_.erase(id);
  scheduler_.finish(id);
  sink(last);
}

void Engine::abort(RequestId id) {
  auto it = outputs_.find(id);
  check(it != outputs_.end(), "engine", "no running request {}", id);
  OutputEvent last;
  last.finish = FinishReason::Abort;
  end(id, it->second, std::move(last));
}

bool Engine::emit(RequestId id, Output& out, const SampledToken& t) {
  OutputEvent ev{id, t.token, t.top, {}, FinishReason::None, std::move(out.prompt_scores)};
  out.prompt_scores.clear();
  const int32_t tok = t.token.id;
  const bool stop_token = std::find(out.stop.stop_ids.begin(), out.stop.stop_ids.end(), tok) != out.stop.stop_ids.end() ||
                          (!out.stop.ignore_eos && std::find(eos_.begin(), eos_.end(), tok) != eos_.end());
  const int64_t generated = int64_t(scheduler_.tokens(id).size()) - out.prompt_len;
  const bool done = stop_token || generated >= out.max_tokens;
  if (out.decoder) {
    if (!stop_token) out.pending += out.decoder->push(tok);  // a stop token's own text is not output
    if (done) out.pending += out.decoder->flush();
  }
  size_t cut = std::string::npos;
  for (const std::string& s : out.stop.stop_strings) cut = std::min(cut, out.pending.find(s));
  if (cut != std::string::npos) {
    ev.text = out.pending.substr(0, cut);
    ev.finish = FinishReason::Stop;
  } else if (done) {
    ev.text = std::move(out.pending);
    ev.finish = stop_token ? FinishReason::Stop : FinishReason::Length;
  } else {
    // Hold back the longest end of the text that may begin a stop string.
    size_t hold = 0;
    for (const std::string& s : out.stop.stop_strings)
      for (size_t n = std::min(s.size() - 1, out.pending.size()); n > hold; --n)
        if (out.pending.compare(out.pending.size() - n, n, s, 0, n) == 0) {
          hold = n;
          break;
        }
    ev.text = out.pending.substr(0, out.pending.size() - hold);
    out.pending.erase(0, out.pending.size() - hold);
  }
  if (ev.finish != FinishReason::None) {
    end(id, out, std::move(ev));
    return true;
  }
  out.sink(ev);
  return false;
}

bool Engine::step() {
  if (!scheduler_.has_work()) return false;
  const auto t0 = std::chrono::steady_clock::now();
  const Scheduler::Step plan = scheduler_.schedule();
  const auto t1 = std::chrono::steady_clock::now();
  times_.schedule_s += std::chrono::duration<double>(t1 - t0).count();
  if (plan.batch.empty()) return true;  // everything was preempted: admitted again next step
  std::vector<Sampler*> samplers;
  std::vector<RequestId> ids;
  bool greedy = true;
  for (size_t i = 0; i < plan.batch.size(); ++i) {
    greedy &= !plan.batch[i].all_logits;
    if (plan.samples[i]) {
      samplers.push_back(&outputs_.at(plan.requests[i]).sampler);
      ids.push_back(plan.requests[i]);
      greedy &= samplers.back()->plain_greedy();
    }
  }
  std::vector<SampledToken> sampled;
  auto t2 = t1;  // when the executor returned
  if (greedy) {
    // Only the ids leave the device: one per row instead of a row of vocabulary logits.
    exec_.forward_greedy(plan.batch, greedy_ids_);
    t2 = std::chrono::steady_clock::now();
    for (size_t i = 0, s = 0; i < plan.batch.size(); ++i)
      if (plan.samples[i]) sampled.push_back(samplers[s++]->take(greedy_ids_[i]));
  } else {
    // One sampling row per logits row: an all_logits entry has one per token, its last sampled.
    std::vector<RowSampling> rows;
    std::vector<size_t> sampled_rows;  // the logits row of each sampler
    bool scoring = false;
    for (size_t i = 0, s = 0; i < plan.batch.size(); ++i) {
      scoring |= plan.batch[i].all_logits;
      rows.resize(rows.size() + (plan.batch[i].all_logits ? plan.batch[i].tokens.size() : 1));
      if (plan.samples[i]) {
        rows.back() = samplers[s++]->next_row();
        sampled_rows.push_back(rows.size() - 1);
      }
    }
    if (scoring) {
      // Prompt scores need the rows on the host: this step samples there too (the same rules).
      exec_.forward(plan.batch, logits_);
      t2 = std::chrono::steady_clock::now();
      const int64_t vocab = exec_.config().vocab_size;
      for (size_t i = 0, row = 0; i < plan.batch.size(); ++i) {
        const int64_t n = plan.batch[i].all_logits ? int64_t(plan.batch[i].tokens.size()) : 1;
        if (plan.batch[i].all_logits) score_prompt(plan.requests[i], plan.starts[i], logits_.data() + row * vocab, n);
        row += size_t(n);
      }
      sample_rows_host(logits_, vocab, rows, step_rows_);
    } else {
      exec_.forward_sample(plan.batch, rows, step_rows_);
      t2 = std::chrono::steady_clock::now();
    }
    for (size_t s = 0; s < samplers.size(); ++s) sampled.push_back(samplers[s]->record(step_rows_, sampled_rows[s]));
  }
  std::vector<int32_t> next;
  for (const SampledToken& t : sampled) next.push_back(t.token.id);
  scheduler_.update(plan, next);
  for (size_t i = 0; i < ids.size(); ++i)
    if (auto it = outputs_.find(ids[i]); it != outputs_.end()) emit(ids[i], it->second, sampled[i]);  // a sink may abort others
  ++times_.steps;
  times_.sequences += int64_t(plan.batch.size());
  times_.forward_s += std::chrono::duration<double>(t2 - t1).count();
  times_.after_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t2).count();
  return true;
}

void Engine::score_prompt(RequestId id, int64_t start, const float* rows, int64_t n) {
  Output& out = outputs_.at(id);
  if (out.prompt_scores.empty()) return;  // sent already: this is a preempted request's recomputation
  const std::vector<int32_t>& tokens = scheduler_.tokens(id);
  // Row r predicts position start + r + 1; a recomputed (preempted) prompt scores it again, alike.
  const int64_t end = std::min(n, out.prompt_len - 1 - start);
  const int64_t vocab = exec_.config().vocab_size;
#pragma omp parallel for if (end > 4)
  for (int64_t r = 0; r < end; ++r)
    out.prompt_scores[size_t(start + r + 1)] = score_token(rows + r * vocab, vocab, tokens[size_t(start + r + 1)], out.prompt_top);
}

void Engine::run() {
  while (step()) {
  }
}

}  // namespace nibble
