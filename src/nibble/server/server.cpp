#include "nibble/server/server.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "nibble/core/error.h"

namespace nibble::server {

using json = nlohmann::json;

// The engine thread's hand-off to one HTTP handler: the events of its choices.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<size_t, OutputEvent>> events;  // (choice, event)
  bool submitted = false;
  std::optional<std::string> refused;  // the engine's reason
  // Engine thread only.
  struct Choice {
    RequestId id = -1;
    bool started = false, finished = false;  // it had its first / last event
    std::chrono::steady_clock::time_point first_token;
    int64_t tokens = 0;
  };
  std::vector<Choice> choices;
  size_t unfinished = 0;
  std::chrono::steady_clock::time_point arrived;
};

namespace {

// An answer in OpenAI's error shape.
struct ApiError {
  int status;
  std::string message;
  std::string param = {};
  std::string code = {};
};

const char* error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 500: return "internal_server_error";
    case 503: return "service_unavailable";
    default: return "invalid_request_error";
  }
}

void send_error(httplib::Response& res, const ApiError& e) {
  const json null_or = nullptr;
  json err = {{"message", e.message},
              {"type", error_type(e.status)},
              {"param", e.param.empty() ? null_or : json(e.param)},
              {"code", e.code.empty() ? null_or : json(e.code)}};
  res.status = e.status;
  res.set_content(json{{"error", err}}.dump(), "application/json");
}

// A request body field of one JSON type, or nullopt when absent or null; 400 naming it when mistyped.
enum class Kind { Bool, Integer, Number, String, Array, Object };
const json* field(const json& body, const char* name, Kind kind) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  static const char* names[] = {"a boolean", "an integer", "a number", "a string", "an array", "an object"};
  const bool ok = kind == Kind::Bool      ? it->is_boolean()
                  : kind == Kind::Integer ? it->is_number_integer()
                  : kind == Kind::Number  ? it->is_number()
                  : kind == Kind::String  ? it->is_string()
                  : kind == Kind::Array   ? it->is_array()
                                          : it->is_object();
  if (!ok) throw ApiError{400, fmt::format("'{}' must be {}", name, names[int(kind)]), name, "invalid_type"};
  return &*it;
}
template <class T>
T value(const json& body, const char* name, Kind kind, T fallback) {
  const json* v = field(body, name, kind);
  return v ? v->get<T>() : fallback;
}

// An integer field within [lo, hi], or `fallback` when absent; 400 naming it otherwise.
int64_t integer_in(const json& body, const char* name, int64_t lo, int64_t hi, int64_t fallback) {
  const json* v = field(body, name, Kind::Integer);
  if (!v) return fallback;
  const int64_t x = v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX) ? INT64_MAX : v->get<int64_t>();
  if (x < lo || x > hi) throw ApiError{400, fmt::format("'{}' must be in {}..{}, got {}", name, lo, hi, x), name, "invalid_value"};
  return x;
}

// OpenAI parameters nibble has no use for: a wrong type is still a 400, as OpenAI answers, and a
// value that would change the answer is refused rather than ignored.
struct UnusedParam {
  const char* name;
  Kind kind;
  bool (*changes_answer)(const json& v, const json& body);
};
void check_unused(const json& body, std::initializer_list<UnusedParam> params) {
  for (const UnusedParam& p : params)
    if (const json* v = field(body, p.name, p.kind); v && p.changes_answer && p.changes_answer(*v, body))
      throw ApiError{400, fmt::format("'{}' is not supported", p.name), p.name, "unsupported_value"};
}
bool non_empty(const json& v, const json&) { return !v.empty(); }
bool non_text_format(const json& v, const json&) { return v.value("type", "text") != "text"; }
bool best_of_past_n(const json& v, const json& body) { return v.get<int64_t>() > body.value("n", int64_t(1)); }

enum class Api { Completion, Chat };

constexpr int64_t kMaxChoices = 128;  // prompts times n in one request

// One HTTP request's generation: its choices (each an engine request), and the OpenAI JSON of its
// answer or stream. Completions' choice p*n + i is prompt p's i-th.
struct Job {
  Api api;
  std::string id, model;
  int64_t created = 0;
  std::vector<Request> requests;  // one per choice
  std::vector<std::string> echo;  // per choice: the prompt's text, output before the answer (completions' echo)
  // Per choice, with echo and logprobs: where each prompt token's text starts in the echo.
  std::vector<std::vector<size_t>> prompt_offsets;
  int64_t prompt_tokens = 0;  // each prompt once, as OpenAI counts
  bool stream = false, include_usage = false, logprobs = false;
  struct ChoiceState {
    int64_t completion_tokens = 0;
    size_t text_offset = 0;  // completions' logprobs: where the next token's text starts
    bool started = false, finished = false;
  };
  std::vector<ChoiceState> state;
  size_t finished = 0;

  const char* object() const {
    if (api == Api::Completion) return "text_completion";
    return stream ? "chat.completion.chunk" : "chat.completion";
  }
  json envelope(json choices) const {
    return {{"id", id}, {"object", object()}, {"created", created}, {"model", model}, {"choices", std::move(choices)}};
  }
  json usage() const {
    int64_t completion = 0;
    for (const auto& c : state) completion += c.completion_tokens;
    return {{"prompt_tokens", prompt_tokens}, {"completion_tokens", completion}, {"total_tokens", prompt_tokens + completion}};
  }

  // Logprobs of a choice's prompt (with echo, from the first event) and of its tokens in `events`:
  // the legacy completions object, or chat's content list.
  json logprobs_of(size_t choice, std::span<const std::pair<size_t, OutputEvent>> events, bool prompt,
                   const Tokenizer& tok) {
    if (!logprobs) return nullptr;
    auto text = [&](int32_t id) { return tok.decode(std::span(&id, 1)); };
    if (api == Api::Completion) {
      json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
      auto add = [&](const SampledToken& t, size_t offset) {
        tokens.push_back(text(t.token.id));
        lps.push_back(std::isnan(t.token.logprob) ? json(nullptr) : json(t.token.logprob));  // a prompt's first
        json top = std::isnan(t.token.logprob) ? json(nullptr) : json::object();
        for (const auto& c : t.top) top[text(c.id)] = c.logprob;
        tops.push_back(std::move(top));
        offsets.push_back(offset);
      };
      for (const auto& [c, ev] : events) {
        if (prompt)
          for (size_t i = 0; i < ev.prompt.size(); ++i) add(ev.prompt[i], prompt_offsets[choice][i]);
        if (ev.token.id < 0) continue;
        add({ev.token, ev.top}, state[choice].text_offset);
        state[choice].text_offset += ev.text.size();  // the text the token made final: offsets index the answer
      }
      return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
    }
    auto entry = [&](const TokenLogprob& t) {
      const std::string s = text(t.id);
      return json{{"token", s}, {"logprob", t.logprob}, {"bytes", std::vector<uint8_t>(s.begin(), s.end())}};
    };
    json content = json::array();
    for (const auto& [c, ev] : events) {
      if (ev.token.id < 0) continue;
      json e = entry(ev.token);
      e["top_logprobs"] = json::array();
      for (const auto& t : ev.top) e["top_logprobs"].push_back(entry(t));
      content.push_back(std::move(e));
    }
    return {{"content", content}};
  }
  static json finish_of(const OutputEvent& ev) {
    return ev.finish == FinishReason::None ? json(nullptr) : json(finish_reason_name(ev.finish));
  }
  // Bookkeeping of one event of a choice: its token, its end.
  void count(size_t choice, const OutputEvent& ev) {
    state[choice].completion_tokens += ev.token.id >= 0;
    if (ev.finish != FinishReason::None) state[choice].finished = true, ++finished;
  }
  bool done() const { return finished == state.size(); }

  // The whole answer: every choice's events, in order.
  json answer(const std::vector<std::vector<std::pair<size_t, OutputEvent>>>& events, const Tokenizer& tok) {
    json choices = json::array();
    for (size_t i = 0; i < events.size(); ++i) {
      std::string text = echo[i];
      for (const auto& [c, ev] : events[i]) text += ev.text;
      json choice = {{"index", i}, {"logprobs", logprobs_of(i, events[i], true, tok)}, {"finish_reason", finish_of(events[i].back().second)}};
      if (api == Api::Completion) choice["text"] = text;
      else choice["message"] = {{"role", "assistant"}, {"content", text}};
      choices.push_back(std::move(choice));
    }
    json out = envelope(std::move(choices));
    out["usage"] = usage();
    return out;
  }

  // Server-sent events, each "data: JSON\n\n".
  std::string sse(json chunk) const {
    if (include_usage) chunk["usage"] = nullptr;  // OpenAI's chunks say so until the usage chunk
    return "data: " + chunk.dump() + "\n\n";
  }
  // What opens a stream: chat's role for each choice.
  std::string stream_start() const {
    std::string out;
    if (api == Api::Chat)
      for (size_t i = 0; i < state.size(); ++i)
        out += sse(envelope(json::array(
            {{{"index", i}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}}})));
    return out;
  }
  // One event's chunk, after the echoed prompt before a choice's first; the last event of the last
  // choice also ends the stream (the usage chunk when asked, then [DONE]).
  std::string stream_event(size_t i, const OutputEvent& ev, const Tokenizer& tok) {
    std::string out;
    const std::pair<size_t, OutputEvent> one[] = {{i, ev}};
    if (!state[i].started) {
      state[i].started = true;
      if (!echo[i].empty()) {
        std::pair<size_t, OutputEvent> prompt{i, {}};
        prompt.second.prompt = ev.prompt;  // the prompt's logprobs come with the first event
        out += sse(envelope(json::array({{{"index", i},
                                          {"text", echo[i]},
                                          {"logprobs", logprobs_of(i, std::span(&prompt, 1), true, tok)},
                                          {"finish_reason", nullptr}}})));
      }
    }
    count(i, ev);
    json choice = {{"index", i}, {"logprobs", logprobs_of(i, one, false, tok)}, {"finish_reason", finish_of(ev)}};
    if (api == Api::Completion) choice["text"] = ev.text;
    else choice["delta"] = ev.text.empty() ? json::object() : json{{"content", ev.text}};
    out += sse(envelope(json::array({choice})));
    if (!done()) return out;
    if (include_usage) {
      json u = envelope(json::array());
      u["usage"] = usage();
      out += "data: " + u.dump() + "\n\n";
    }
    return out + "data: [DONE]\n\n";
  }
};

// Sampling and stop fields the two routes share, into the request every choice starts from; n.
int64_t parse_common(const json& body, Job& job, Request& base) {
  const json* model = field(body, "model", Kind::String);
  if (model && *model != job.model)
    throw ApiError{404, fmt::format("the model '{}' does not exist: this server serves '{}'", model->get<std::string>(),
                                    job.model),
                   "model", "model_not_found"};
  const int64_t n = integer_in(body, "n", 1, kMaxChoices, 1);
  SamplingParams& s = base.sampling;
  s.temperature = value<float>(body, "temperature", Kind::Number, 1.0f);
  s.top_p = value<float>(body, "top_p", Kind::Number, 1.0f);
  s.presence_penalty = value<float>(body, "presence_penalty", Kind::Number, 0.0f);
  s.frequency_penalty = value<float>(body, "frequency_penalty", Kind::Number, 0.0f);
  if (const json* stop = body.contains("stop") && body["stop"].is_string() ? &body["stop"] : nullptr) {
    base.stop.stop_strings = {stop->get<std::string>()};
  } else if (const json* list = field(body, "stop", Kind::Array)) {
    for (const auto& x : *list) {
      if (!x.is_string()) throw ApiError{400, "'stop' must be a string or a list of strings", "stop", "invalid_type"};
      base.stop.stop_strings.push_back(x);
    }
  }
  base.stop.ignore_eos = value<bool>(body, "ignore_eos", Kind::Bool, false);  // vLLM's extension (bench-serve sends it)
  job.stream = value<bool>(body, "stream", Kind::Bool, false);
  if (const json* opts = field(body, "stream_options", Kind::Object))
    job.include_usage = value<bool>(*opts, "include_usage", Kind::Bool, false);
  check_unused(body, {{"user", Kind::String, nullptr}, {"logit_bias", Kind::Object, non_empty}});
  return n;
}

// Each prompt's choices: n copies of `base` with its prompt. With a seed, choice c samples with
// seed + c (OpenAI's n choices differ); without one, each with a seed of its own.
void add_choices(const json& body, Job& job, const Request& base, int64_t n, std::vector<std::vector<int32_t>> prompts) {
  check(int64_t(prompts.size()) * n <= kMaxChoices, "n", "{} prompts times n = {} asks for {} choices, more than {}",
        prompts.size(), n, int64_t(prompts.size()) * n, kMaxChoices);
  const json* seed = field(body, "seed", Kind::Integer);
  for (auto& prompt : prompts) {
    job.prompt_tokens += int64_t(prompt.size());
    for (int64_t i = 0; i < n; ++i) {
      Request r = base;
      r.prompt = prompt;
      r.sampling.seed = (seed ? seed->get<uint64_t>() : std::random_device{}()) + job.requests.size();
      job.requests.push_back(std::move(r));
    }
  }
  job.state.resize(job.requests.size());
}

// Completions' prompt: a string, a list of strings, a list of token ids, or a list of those lists.
std::vector<std::vector<int32_t>> completion_prompts(const json& body, const Tokenizer& tok, std::vector<std::string>* texts) {
  const json* p = body.contains("prompt") && body["prompt"].is_string() ? &body["prompt"] : field(body, "prompt", Kind::Array);
  const ApiError wrong{400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                       "prompt", "invalid_type"};
  if (!p) throw ApiError{400, "'prompt' is required", "prompt", "missing_field"};
  auto ids = [&](const json& list) {
    std::vector<int32_t> out;
    for (const auto& x : list) {
      if (!x.is_number_integer()) throw wrong;
      if (x.get<int64_t>() < 0 || x.get<int64_t>() > INT32_MAX)
        throw ApiError{400, fmt::format("prompt token {} is outside the vocabulary", x.dump()), "prompt", "invalid_value"};
      out.push_back(int32_t(x.get<int64_t>()));
    }
    return out;
  };
  std::vector<std::vector<int32_t>> prompts;
  auto add_text = [&](const std::string& text) {
    prompts.push_back(tok.encode(text, true));  // BOS as Hugging Face adds it
    texts->push_back(text);
  };
  auto add_ids = [&](std::vector<int32_t> p) {
    texts->push_back(tok.decode(p, /*skip_special=*/true));
    prompts.push_back(std::move(p));
  };
  if (p->is_string()) add_text(*p);
  else if (p->empty()) throw ApiError{400, "'prompt' is an empty list", "prompt", "invalid_value"};
  else if ((*p)[0].is_number_integer()) add_ids(ids(*p));
  else
    for (const auto& x : *p)
      if (x.is_string()) add_text(x);
      else if (x.is_array()) add_ids(ids(x));
      else throw wrong;
  return prompts;
}

// Where each token of `prompt` starts in its decoded text (special tokens add none).
std::vector<size_t> token_offsets(std::span<const int32_t> prompt, const Tokenizer& tok) {
  StreamDecoder decoder(tok, /*skip_special=*/true);
  std::vector<size_t> out;
  size_t at = 0;
  for (int32_t id : prompt) {
    out.push_back(at);
    at += decoder.push(id).size();
  }
  return out;
}

// The server's counts: Prometheus text.
std::string metrics_text(const ServerMetrics& m) {
  std::string out;
  auto add = [&](const char* name, const char* type, const char* help, int64_t v) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
  };
  add("nibble_requests_waiting", "gauge", "Engine requests (one per choice) without a first token.", m.waiting);
  add("nibble_requests_running", "gauge", "Engine requests generating.", m.running);
  add("nibble_connections_queued", "gauge", "Connections waiting for a handler thread.", m.queued_connections);
  add("nibble_kv_pages_used", "gauge", "KV cache pages in use, the prefix cache's included.", m.kv_pages_used);
  // The CPU pool without --kv-pages grows in host memory: a count of free pages would mean nothing.
  if (m.kv_pool_bounded) add("nibble_kv_pages_free", "gauge", "KV cache pages free.", m.kv_pages_free);
  add("nibble_prompt_tokens_total", "counter", "Prompt tokens of submitted engine requests.", m.prompt_tokens);
  add("nibble_generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens);
  add("nibble_prefix_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache.", m.prefix_hit_tokens);
  add("nibble_requests_finished_total", "counter", "Engine requests that ended with stop or length.", m.finished);
  add("nibble_requests_aborted_total", "counter", "Engine requests aborted (client gone or shutdown).", m.aborted);
  add("nibble_client_disconnects_total", "counter", "Answers whose client left before the end.", m.client_disconnects);
  add("nibble_requests_rejected_total", "counter", "Requests answered 429 (queue full) or 503 (stopping).", m.rejected);
  out += m.ttft.text("nibble_time_to_first_token_seconds", "From arrival to the first token.");
  out += m.tpot.text("nibble_time_per_output_token_seconds", "Between tokens after the first, per finished request.");
  out += m.e2e.text("nibble_request_latency_seconds", "From arrival to the last token, per finished request.");
  return out;
}

// How often a quiet answer writes something to find out whether its client is still there.
constexpr auto kKeepAlive = std::chrono::milliseconds(250);

// Holds one place of --max-queue until the answer is sent.
struct QueueSlot {
  explicit QueueSlot(std::atomic<int64_t>& c) : count(c) {}  // clang 14: no aggregate make_shared
  std::atomic<int64_t>& count;
  ~QueueSlot() { --count; }
};

thread_local bool t_overflow_thread = false;

}  // namespace

void Histogram::observe(double seconds) {
  std::lock_guard l(mu_);
  ++counts_[size_t(std::lower_bound(bounds_.begin(), bounds_.end(), seconds) - bounds_.begin())];
  sum_ += seconds;
}

int64_t Histogram::count() const {
  std::lock_guard l(mu_);
  return std::accumulate(counts_.begin(), counts_.end(), int64_t(0));
}

std::string Histogram::text(const char* name, const char* help) const {
  std::lock_guard l(mu_);
  std::string out = fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name);
  int64_t cumulative = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < bounds_.size() ? fmt::format("{}", bounds_[i]) : "+Inf";
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, le, cumulative);
  }
  return out + fmt::format("{}_sum {}\n{}_count {}\n", name, sum_, name, cumulative);
}

// httplib's handler threads, each holding one connection, and the connections waiting for one.
// Those wait in the server too: past --max-queue a new connection goes to an overflow thread,
// where a generation request is answered 429 at once instead of waiting.
class HandlerPool final : public httplib::TaskQueue {
 public:
  HandlerPool(int threads, std::function<bool(int64_t waiting)> full, std::atomic<int64_t>& queued)
      : full_(std::move(full)), queued_(queued) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { work(false); });
    for (int i = 0; i < kOverflowThreads; ++i) threads_.emplace_back([this] { work(true); });
  }
  void enqueue(std::function<void()> fn) override {
    {
      std::lock_guard l(mu_);
      const int64_t waiting = std::max<int64_t>(0, int64_t(jobs_.size()) + 1 - idle_);  // with this one
      if (waiting > 0 && full_(waiting)) {
        overflow_.push_back(std::move(fn));
      } else {
        jobs_.push_back(std::move(fn));
        queued_ = int64_t(jobs_.size());
      }
    }
    cv_.notify_all();
  }
  void shutdown() override {
    {
      std::lock_guard l(mu_);
      shutdown_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  static constexpr int kOverflowThreads = 2;
  void work(bool overflow) {
    t_overflow_thread = overflow;
    auto& queue = overflow ? overflow_ : jobs_;
    while (true) {
      std::function<void()> fn;
      {
        std::unique_lock l(mu_);
        idle_ += !overflow;
        cv_.wait(l, [&] { return !queue.empty() || shutdown_; });
        idle_ -= !overflow;
        if (queue.empty()) return;  // shut down, every connection answered
        fn = std::move(queue.front());
        queue.pop_front();
        if (!overflow) queued_ = int64_t(jobs_.size());
      }
      fn();
    }
  }

  std::function<bool(int64_t)> full_;
  std::atomic<int64_t>& queued_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_, overflow_;
  int64_t idle_ = 0;
  bool shutdown_ = false;
  std::vector<std::thread> threads_;
};

// The routes: parse, submit, answer.
struct Handlers {
  Server& s;

  Job parse(const httplib::Request& req, Api api) const {
    json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded()) throw ApiError{400, "the request body is not valid JSON", "", "invalid_json"};
    if (!body.is_object()) throw ApiError{400, "the request body must be a JSON object", "", "invalid_json"};
    Job job;
    job.api = api;
    job.id = fmt::format("{}-{}", api == Api::Chat ? "chatcmpl" : "cmpl", s.next_id_++);
    job.model = s.opt_.model_name;
    job.created = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
    Request base;
    const int64_t n = parse_common(body, job, base);
    if (api == Api::Completion) {
      check_unused(body, {{"best_of", Kind::Integer, best_of_past_n}, {"suffix", Kind::String, non_empty}});
      base.stop.max_tokens = value<int64_t>(body, "max_tokens", Kind::Integer, 16);
      const int64_t top = integer_in(body, "logprobs", 0, 20, -1);
      job.logprobs = top >= 0;
      base.sampling.logprobs = int(std::max<int64_t>(top, 0));
      const bool echo = value<bool>(body, "echo", Kind::Bool, false);
      base.prompt_logprobs = echo && job.logprobs;
      std::vector<std::string> texts;
      auto prompts = completion_prompts(body, s.tokenizer_, &texts);
      for (size_t p = 0; p < prompts.size(); ++p)
        for (int64_t i = 0; i < n; ++i) {
          job.echo.push_back(echo ? texts[p] : "");
          if (base.prompt_logprobs) job.prompt_offsets.push_back(token_offsets(prompts[p], s.tokenizer_));
        }
      add_choices(body, job, base, n, std::move(prompts));
    } else {
      check_unused(body, {{"response_format", Kind::Object, non_text_format},
                          {"tools", Kind::Array, non_empty},
                          {"parallel_tool_calls", Kind::Bool, nullptr},
                          {"store", Kind::Bool, nullptr},
                          {"metadata", Kind::Object, nullptr},
                          {"service_tier", Kind::String, nullptr}});
      if (!s.opt_.chat_template)
        throw ApiError{400, "this model has no chat template: start the server with --chat-template NAME", "messages",
                       "no_chat_template"};
      const json* list = field(body, "messages", Kind::Array);
      if (!list || list->empty()) throw ApiError{400, "'messages' is required (a non-empty list)", "messages", "missing_field"};
      std::vector<ChatMessage> messages;
      for (const auto& m : *list) {
        if (!m.is_object()) throw ApiError{400, "each message must be an object", "messages", "invalid_type"};
        ChatMessage msg{value<std::string>(m, "role", Kind::String, ""), ""};
        if (const json* c = m.contains("content") && m["content"].is_string() ? &m["content"] : nullptr) {
          msg.content = *c;
        } else if (const json* parts = field(m, "content", Kind::Array)) {  // [{"type": "text", "text": ...}]
          for (const auto& part : *parts)
            if (part.is_object() && part.value("type", "") == "text" && part.contains("text") && part["text"].is_string())
              msg.content += part["text"].get<std::string>();
            else
              throw ApiError{400, "only text content parts are supported", "messages", "invalid_type"};
        }
        messages.push_back(std::move(msg));
      }
      const ChatTemplate& tmpl = *s.opt_.chat_template;
      // The assistant's end of turn ends the answer when it is one token.
      const auto end = s.tokenizer_.encode(tmpl.end_of_turn(), false);
      if (end.size() == 1) base.stop.stop_ids.push_back(end[0]);
      const json* max = field(body, "max_completion_tokens", Kind::Integer);
      if (!max) max = field(body, "max_tokens", Kind::Integer);
      base.stop.max_tokens = max ? max->get<int64_t>() : -1;  // -1: until the context is full
      job.logprobs = value<bool>(body, "logprobs", Kind::Bool, false);
      base.sampling.logprobs = job.logprobs ? int(integer_in(body, "top_logprobs", 0, 20, 0)) : 0;
      add_choices(body, job, base, n, {s.tokenizer_.encode(tmpl.render(messages), false)});
      job.echo.assign(job.requests.size(), "");
    }
    if (base.stop.max_tokens < 1) throw ApiError{400, "'max_tokens' must be at least 1", "max_tokens", "invalid_value"};
    for (size_t i = 0; i < job.state.size(); ++i) job.state[i].text_offset = job.echo[i].size();
    return job;
  }

  // Moves the channel's events to `into` (per choice) until every choice has ended (true) or
  // `wait` has passed (false).
  static bool gather(Channel& ch, Job& job, std::vector<std::vector<std::pair<size_t, OutputEvent>>>& into,
                     std::chrono::milliseconds wait) {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    while (!job.done()) {
      std::deque<std::pair<size_t, OutputEvent>> events;
      {
        std::unique_lock l(ch.mu);
        if (!ch.cv.wait_until(l, deadline, [&] { return !ch.events.empty(); })) return false;
        events.swap(ch.events);
      }
      for (auto& e : events) {
        job.count(e.first, e.second);
        into[e.first].push_back(std::move(e));
      }
    }
    return true;
  }
  // A finished job's answer body, or the error of a choice that was aborted.
  std::string body_of(Job& job, const std::vector<std::vector<std::pair<size_t, OutputEvent>>>& events, int* status) const {
    for (const auto& c : events)
      if (c.back().second.finish == FinishReason::Abort) {
        httplib::Response res;
        send_error(res, {503, "the request was aborted: the server is stopping or its engine failed", "", "aborted"});
        *status = res.status;
        return res.body;
      }
    *status = 200;
    return job.answer(events, s.tokenizer_).dump();
  }

  void generate(const httplib::Request& req, httplib::Response& res, Api api) const {
    try {
      if (t_overflow_thread) {
        ++s.metrics_.rejected;
        throw ApiError{429, fmt::format("the server holds {} requests already (--max-queue): retry later", s.opt_.max_queue),
                       "", "queue_full"};
      }
      if (s.in_server_.fetch_add(1) >= s.opt_.max_queue) {
        --s.in_server_;
        ++s.metrics_.rejected;
        throw ApiError{429, fmt::format("the server holds {} requests already (--max-queue): retry later", s.opt_.max_queue),
                       "", "queue_full"};
      }
      auto slot = std::make_shared<QueueSlot>(s.in_server_);
      if (s.draining_) {  // after the slot is taken: drain() waits for every slot it did not see refused
        ++s.metrics_.rejected;
        throw ApiError{503, "the server is shutting down", "", "shutting_down"};
      }
      auto job = std::make_shared<Job>(parse(req, api));
      std::shared_ptr<Channel> ch = s.submit(job->requests);
      auto events = std::make_shared<std::vector<std::vector<std::pair<size_t, OutputEvent>>>>(job->requests.size());
      // A client gone before its answer: its request ends and frees its pages.
      auto client_left = [this, ch] {
        ++s.metrics_.client_disconnects;
        s.abort(ch);
        return false;
      };
      // A stream httplib gave up on (the client left before it began) ends its request too.
      auto release = [this, ch](bool success) {
        if (!success) s.abort(ch);
      };
      if (!job->stream) {
        // A quick answer goes whole. A longer one is sent chunked, a space (which JSON allows
        // before a value) every kKeepAlive while it runs: writing is how a client that left is
        // found, since httplib 0.11 cannot see a closed socket otherwise.
        if (gather(*ch, *job, *events, kKeepAlive)) {
          int status;
          std::string body = body_of(*job, *events, &status);
          res.status = status;
          res.set_content(body, "application/json");
          return;
        }
        res.set_chunked_content_provider(
            "application/json",
            [this, slot, ch, job, events, client_left](size_t, httplib::DataSink& sink) {
              while (!gather(*ch, *job, *events, kKeepAlive))
                if (!sink.write(" ", 1)) return client_left();
              int status;
              const std::string body = body_of(*job, *events, &status);
              if (!sink.write(body.data(), body.size())) return client_left();
              sink.done();
              return true;
            },
            release);
        return;
      }
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream", [this, slot, ch, job, client_left, started = false](size_t, httplib::DataSink& sink) mutable {
            auto send = [&](const std::string& text) { return text.empty() || sink.write(text.data(), text.size()); };
            if (!started && !send(job->stream_start())) return client_left();
            started = true;
            auto last_write = std::chrono::steady_clock::now();
            while (true) {
              std::deque<std::pair<size_t, OutputEvent>> events;
              {
                std::unique_lock l(ch->mu);
                ch->cv.wait_for(l, std::chrono::milliseconds(50), [&] { return !ch->events.empty(); });
                events.swap(ch->events);
              }
              // A quiet stream says it is alive now and then (an SSE comment), to find a client that left.
              if (events.empty()) {
                if (std::chrono::steady_clock::now() - last_write < kKeepAlive) continue;
                if (!send(": keep-alive\n\n")) return client_left();
                last_write = std::chrono::steady_clock::now();
              }
              for (const auto& [choice, ev] : events) {
                if (!send(job->stream_event(choice, ev, s.tokenizer_))) return client_left();
                last_write = std::chrono::steady_clock::now();
                if (job->done()) {
                  sink.done();
                  return true;
                }
              }
            }
          },
          release);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const Error& e) {  // the request's text, template or parameters, as the engine checks them
      send_error(res, {400, e.what(), "", "invalid_request"});
    }
  }
};

Server::Server(Engine& engine, const Tokenizer& tokenizer, ServerOptions opt)
    : engine_(engine), tokenizer_(tokenizer), opt_(std::move(opt)), http_(std::make_unique<httplib::Server>()) {
  const KVPool& kv = engine.executor().kv();
  metrics_.kv_pool_bounded = kv.capacity_tokens() < kUnboundedKVTokens;
  metrics_.kv_pages_free = kv.free_tokens() / kKVPageTokens;
  http_->new_task_queue = [this] {
    return new HandlerPool(
        opt_.http_threads, [this](int64_t waiting) { return in_server_ + waiting > opt_.max_queue; },
        metrics_.queued_connections);
  };
  http_->set_payload_max_length(opt_.max_body);
  http_->set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (opt_.api_key.empty() || req.path == "/health" || req.get_header_value("Authorization") == "Bearer " + opt_.api_key)
      return httplib::Server::HandlerResponse::Unhandled;
    send_error(res, {401, "a missing or wrong API key: send 'Authorization: Bearer KEY'", "", "invalid_api_key"});
    return httplib::Server::HandlerResponse::Handled;
  });
  // httplib's own errors (unknown route, body over --max-body) get OpenAI's shape too.
  http_->set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404) send_error(res, {404, fmt::format("no route {} {}", req.method, req.path), "", "not_found"});
    else if (res.status == 413) send_error(res, {413, "the request body is over --max-body", "", "body_too_large"});
    else send_error(res, {res.status, fmt::format("HTTP status {}", res.status)});
  });
  http_->set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, {500, what});
  });
  auto handlers = std::make_shared<Handlers>(Handlers{*this});
  http_->Post("/v1/completions", [handlers](const httplib::Request& req, httplib::Response& res) {
    handlers->generate(req, res, Api::Completion);
  });
  http_->Post("/v1/chat/completions", [handlers](const httplib::Request& req, httplib::Response& res) {
    handlers->generate(req, res, Api::Chat);
  });
  http_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json model = {{"id", opt_.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "nibble"}};
    res.set_content(json{{"object", "list"}, {"data", json::array({model})}}.dump(), "application/json");
  });
  http_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_) res.status = 503;  // a load balancer's cue to send no more
    res.set_content(draining_ ? R"({"status":"draining"})" : R"({"status":"ok"})", "application/json");
  });
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_text(metrics_), "text/plain; version=0.0.4");
  });
  engine_thread_ = std::thread([this] { engine_loop(); });
}

Server::~Server() { stop(); }

void check_can_listen(const std::string& host, int port) {
  if (port == 0) return;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  check(rc == 0, "serve", "cannot listen on {}:{}: {}", host, port, gai_strerror(rc));
  std::string why;
  bool bound = false;
  for (const addrinfo* a = found; a && !bound; a = a->ai_next) {  // as httplib binds: the first address that takes it
    const int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    httplib::default_socket_options(fd);
    bound = ::bind(fd, a->ai_addr, a->ai_addrlen) == 0;
    if (!bound) why = std::strerror(errno);
    ::close(fd);
  }
  freeaddrinfo(found);
  check(bound, "serve", "cannot listen on {}:{}: {}", host, port, why);
}

int Server::bind(const std::string& host, int port) {
  // httplib 0.11 listens with a backlog of 5, which drops connections that arrive together: the
  // socket is kept to listen again with the system's largest backlog.
  auto listening = std::make_shared<int>(-1);
  http_->set_socket_options([listening](socket_t sock) {
    httplib::default_socket_options(sock);
    *listening = sock;
  });
  const int bound = port == 0 ? http_->bind_to_any_port(host) : (http_->bind_to_port(host, port) ? port : -1);
  if (bound <= 0) check_can_listen(host, port);  // the system's reason, when the probe meets it too
  check(bound > 0, "serve", "cannot listen on {}:{}", host, port);
  check(::listen(*listening, SOMAXCONN) == 0, "serve", "cannot listen on {}:{} with a backlog of {}", host, port, SOMAXCONN);
  return bound;
}

void Server::listen() { http_->listen_after_bind(); }

void Server::stop() {
  std::lock_guard one(stop_mu_);
  {
    std::lock_guard l(queue_mu_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  if (engine_thread_.joinable()) engine_thread_.join();  // it aborts what runs: the handlers answer
  http_->stop();
}

void Server::drain() {
  draining_ = true;
  while (in_server_ > 0) {
    {
      std::lock_guard l(queue_mu_);
      if (stopping_) return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  stop();
}

std::unique_lock<std::mutex> Server::hold_engine() {
  ++hold_requests_;
  std::unique_lock hold(engine_mu_);
  --hold_requests_;
  return hold;
}

std::shared_ptr<Channel> Server::submit(std::vector<Request> requests) {
  auto ch = std::make_shared<Channel>();
  ch->arrived = std::chrono::steady_clock::now();
  {
    std::lock_guard l(queue_mu_);
    check(!stopping_, "serve", "the server is shutting down");
    metrics_.waiting += int64_t(requests.size());
    pending_.emplace_back(std::move(requests), ch);
  }
  queue_cv_.notify_all();
  std::unique_lock l(ch->mu);
  ch->cv.wait(l, [&] { return ch->submitted || ch->refused; });
  if (ch->refused) throw Error(*ch->refused);
  return ch;
}

void Server::abort(const std::shared_ptr<Channel>& channel) {
  {
    std::lock_guard l(queue_mu_);
    aborts_.push_back(channel);
  }
  queue_cv_.notify_all();
}

void Server::engine_loop() {
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  // Events go to the handler; the counts and times /metrics shows follow them.
  auto sink_for = [this, seconds](std::shared_ptr<Channel> ch, size_t choice) {
    return [this, ch, choice, seconds](const OutputEvent& ev) {
      Channel::Choice& c = ch->choices[choice];
      const auto now = Clock::now();
      if (!c.started) {
        c.started = true;
        c.first_token = now;
        --metrics_.waiting;
        ++metrics_.running;
        if (ev.token.id >= 0) metrics_.ttft.observe(seconds(now - ch->arrived));
      }
      c.tokens += ev.token.id >= 0;
      metrics_.generated_tokens += ev.token.id >= 0;
      if (ev.finish != FinishReason::None) {
        c.finished = true;
        --metrics_.running;
        if (ev.finish == FinishReason::Abort) {
          ++metrics_.aborted;
        } else {
          ++metrics_.finished;
          metrics_.e2e.observe(seconds(now - ch->arrived));
          if (c.tokens > 1) metrics_.tpot.observe(seconds(now - c.first_token) / double(c.tokens - 1));
        }
        if (--ch->unfinished == 0) active_.erase(ch);
      }
      std::lock_guard l(ch->mu);
      ch->events.emplace_back(choice, ev);
      ch->cv.notify_all();
    };
  };
  auto answer = [](Channel& ch, std::optional<std::string> refused) {
    std::lock_guard l(ch.mu);
    ch.submitted = !refused;
    ch.refused = std::move(refused);
    ch.cv.notify_all();
  };
  // Ends a channel's unfinished requests (their last events reach it).
  auto abort_all = [this](const std::shared_ptr<Channel>& ch) {
    for (const Channel::Choice& c : std::vector(ch->choices))
      if (c.id >= 0 && !c.finished) engine_.abort(c.id);
  };
  while (true) {
    decltype(pending_) pending;
    decltype(aborts_) aborts;
    bool stopping;
    {
      std::unique_lock l(queue_mu_);
      queue_cv_.wait(l, [&] { return stopping_ || !pending_.empty() || !aborts_.empty() || !active_.empty(); });
      pending.swap(pending_);
      aborts.swap(aborts_);
      stopping = stopping_;
    }
    std::unique_lock hold(engine_mu_);
    for (const auto& ch : aborts)
      if (active_.count(ch)) abort_all(ch);
    for (auto& [requests, ch] : pending) {
      ch->choices.resize(requests.size());
      size_t submitted = 0;
      try {
        check(!stopping, "serve", "the server is shutting down");
        for (; submitted < requests.size(); ++submitted) {
          const int64_t prompt = int64_t(requests[submitted].prompt.size());
          ch->choices[submitted].id = engine_.submit(std::move(requests[submitted]), sink_for(ch, submitted));
          ++ch->unfinished;
          metrics_.prompt_tokens += prompt;
        }
        active_.insert(ch);
        answer(*ch, std::nullopt);
      } catch (const Error& e) {
        metrics_.waiting -= int64_t(requests.size() - submitted);
        abort_all(ch);  // the choices submitted before the one refused
        answer(*ch, e.what());
      }
    }
    if (stopping)
      for (const auto& ch : std::vector(active_.begin(), active_.end())) abort_all(ch);
    else if (!active_.empty())
      try {
        engine_.step();
      } catch (const std::exception& e) {  // a bug, not a request's fault: its requests end, the server goes on
        std::fprintf(stderr, "nibble serve: the engine failed (%s): aborting its %zu requests\n", e.what(), active_.size());
        for (const auto& ch : std::vector(active_.begin(), active_.end())) abort_all(ch);
      }
    metrics_.kv_pages_used = engine_.pages_in_use();
    metrics_.kv_pages_free = engine_.executor().kv().free_tokens() / kKVPageTokens;
    metrics_.prefix_hit_tokens = engine_.stats().prefix_hit_tokens;
    if (stopping) return;
    hold.unlock();
    // std::mutex is not fair: a waiting hold_engine() gets the lock before the next step.
    while (hold_requests_ > 0) std::this_thread::yield();
  }
}

}  // namespace nibble::server
