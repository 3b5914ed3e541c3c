#include "nibble/server/server.h"

#include <chrono>
#include <cstdio>
#include <random>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "nibble/core/error.h"

namespace nibble::server {

using json = nlohmann::json;

// The engine thread's hand-off to one HTTP handler.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<OutputEvent> events;
  bool submitted = false;
  std::optional<std::string> refused;  // the engine's reason
  RequestId id = -1;
  bool started = false;  // engine thread only: it had its first event
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

enum class Api { Completion, Chat };

// One HTTP request's generation: its parameters, and the OpenAI JSON of its answer or stream.
struct Job {
  Api api;
  std::string id, model;
  int64_t created = 0;
  Request request;
  bool stream = false, include_usage = false;
  std::string echo_text;  // completions with echo: the prompt, output before the answer
  bool logprobs = false;
  int64_t completion_tokens = 0;
  size_t text_offset = 0;  // completions' logprobs: where the next token's text starts

  const char* object() const {
    if (api == Api::Completion) return "text_completion";
    return stream ? "chat.completion.chunk" : "chat.completion";
  }
  json envelope(json choices) const {
    return {{"id", id}, {"object", object()}, {"created", created}, {"model", model}, {"choices", std::move(choices)}};
  }
  json usage() const {
    const int64_t prompt = int64_t(request.prompt.size());
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion_tokens}, {"total_tokens", prompt + completion_tokens}};
  }
  // The logprobs of `events`' tokens: the legacy completions object or chat's content list.
  json logprobs_of(std::span<const OutputEvent> events, const Tokenizer& tok) {
    if (!logprobs) return nullptr;
    auto text = [&](int32_t id) { return tok.decode(std::span(&id, 1)); };
    if (api == Api::Completion) {
      json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
      for (const auto& ev : events) {
        if (ev.token.id < 0) continue;
        const std::string t = text(ev.token.id);
        tokens.push_back(t);
        lps.push_back(ev.token.logprob);
        json top = json::object();
        for (const auto& c : ev.top) top[text(c.id)] = c.logprob;
        tops.push_back(std::move(top));
        offsets.push_back(text_offset);
        text_offset += ev.text.size();  // the text the token made final: offsets index the answer
      }
      return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
    }
    auto entry = [&](const TokenLogprob& t) {
      const std::string s = text(t.id);
      return json{{"token", s}, {"logprob", t.logprob}, {"bytes", std::vector<uint8_t>(s.begin(), s.end())}};
    };
    json content = json::array();
    for (const auto& ev : events) {
      if (ev.token.id < 0) continue;
      json e = entry(ev.token);
      e["top_logprobs"] = json::array();
      for (const auto& c : ev.top) e["top_logprobs"].push_back(entry(c));
      content.push_back(std::move(e));
    }
    return {{"content", content}};
  }
  static json finish_of(const OutputEvent& ev) {
    return ev.finish == FinishReason::None ? json(nullptr) : json(finish_reason_name(ev.finish));
  }

  // The whole answer of a finished request.
  json answer(const std::vector<OutputEvent>& events, const Tokenizer& tok) {
    std::string text = echo_text;
    for (const auto& ev : events) {
      text += ev.text;
      completion_tokens += ev.token.id >= 0;
    }
    json choice = {{"index", 0}, {"logprobs", logprobs_of(events, tok)}, {"finish_reason", finish_of(events.back())}};
    if (api == Api::Completion) choice["text"] = text;
    else choice["message"] = {{"role", "assistant"}, {"content", text}};
    json out = envelope(json::array({choice}));
    out["usage"] = usage();
    return out;
  }

  // Server-sent events, each "data: JSON\n\n".
  std::string sse(json chunk) const {
    if (include_usage) chunk["usage"] = nullptr;  // OpenAI's chunks say so until the usage chunk
    return "data: " + chunk.dump() + "\n\n";
  }
  // What opens a stream: chat's role, or the echoed prompt.
  std::string stream_start() const {
    if (api == Api::Chat)
      return sse(envelope(json::array(
          {{{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}}, {"logprobs", nullptr}, {"finish_reason", nullptr}}})));
    if (!echo_text.empty())
      return sse(envelope(json::array({{{"index", 0}, {"text", echo_text}, {"logprobs", nullptr}, {"finish_reason", nullptr}}})));
    return "";
  }
  // One event's chunk; the last also ends the stream (usage chunk when asked, then [DONE]).
  std::string stream_event(const OutputEvent& ev, const Tokenizer& tok) {
    completion_tokens += ev.token.id >= 0;
    json choice = {{"index", 0}, {"logprobs", logprobs_of(std::span(&ev, 1), tok)}, {"finish_reason", finish_of(ev)}};
    if (api == Api::Completion) choice["text"] = ev.text;
    else choice["delta"] = ev.text.empty() ? json::object() : json{{"content", ev.text}};
    std::string out = sse(envelope(json::array({choice})));
    if (ev.finish == FinishReason::None) return out;
    if (include_usage) {
      json u = envelope(json::array());
      u["usage"] = usage();
      out += "data: " + u.dump() + "\n\n";
    }
    return out + "data: [DONE]\n\n";
  }
};

// Sampling and stop fields the two routes share.
void parse_common(const json& body, Job& job) {
  const json* model = field(body, "model", Kind::String);
  if (model && *model != job.model)
    throw ApiError{404, fmt::format("the model '{}' does not exist: this server serves '{}'", model->get<std::string>(),
                                    job.model),
                   "model", "model_not_found"};
  if (value<int64_t>(body, "n", Kind::Integer, 1) != 1)
    throw ApiError{400, "n other than 1 is not supported yet", "n", "unsupported_value"};
  SamplingParams& s = job.request.sampling;
  s.temperature = value<float>(body, "temperature", Kind::Number, 1.0f);
  s.top_p = value<float>(body, "top_p", Kind::Number, 1.0f);
  s.presence_penalty = value<float>(body, "presence_penalty", Kind::Number, 0.0f);
  s.frequency_penalty = value<float>(body, "frequency_penalty", Kind::Number, 0.0f);
  // Without a seed each request samples differently, as OpenAI's do.
  const json* seed = field(body, "seed", Kind::Integer);
  s.seed = seed ? seed->get<uint64_t>() : std::random_device{}();
  if (const json* stop = body.contains("stop") && body["stop"].is_string() ? &body["stop"] : nullptr) {
    job.request.stop.stop_strings = {stop->get<std::string>()};
  } else if (const json* list = field(body, "stop", Kind::Array)) {
    for (const auto& x : *list) {
      if (!x.is_string()) throw ApiError{400, "'stop' must be a string or a list of strings", "stop", "invalid_type"};
      job.request.stop.stop_strings.push_back(x);
    }
  }
  job.stream = value<bool>(body, "stream", Kind::Bool, false);
  if (const json* opts = field(body, "stream_options", Kind::Object))
    job.include_usage = value<bool>(*opts, "include_usage", Kind::Bool, false);
}

// The engine's statuses: Prometheus text.
std::string metrics_text(const ServerMetrics& m) {
  std::string out;
  auto add = [&](const char* name, const char* type, const char* help, int64_t v) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n{} {}\n", name, help, name, type, name, v);
  };
  add("nibble_requests_waiting", "gauge", "Requests in the server without a first token.", m.waiting);
  add("nibble_requests_running", "gauge", "Requests generating.", m.running);
  add("nibble_kv_pages_used", "gauge", "KV cache pages in use, the prefix cache's included.", m.kv_pages_used);
  add("nibble_kv_pages_free", "gauge", "KV cache pages free (the CPU's pool without --kv-pages has 2^36).",
      m.kv_pages_free);
  add("nibble_prompt_tokens_total", "counter", "Prompt tokens of submitted requests.", m.prompt_tokens);
  add("nibble_generated_tokens_total", "counter", "Tokens generated.", m.generated_tokens);
  add("nibble_prefix_hit_tokens_total", "counter", "Prompt tokens taken from the prefix cache.", m.prefix_hit_tokens);
  add("nibble_requests_finished_total", "counter", "Requests that ended with stop or length.", m.finished);
  add("nibble_requests_aborted_total", "counter", "Requests aborted (client gone or shutdown).", m.aborted);
  add("nibble_client_disconnects_total", "counter", "Streams whose client left before the end.", m.client_disconnects);
  return out;
}

// Holds one place of --max-queue until the answer is sent.
constexpr auto kKeepAlive = std::chrono::milliseconds(250);

struct QueueSlot {
  explicit QueueSlot(std::atomic<int64_t>& c) : count(c) {}  // clang 14: no aggregate make_shared
  std::atomic<int64_t>& count;
  ~QueueSlot() { --count; }
};

}  // namespace

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
    parse_common(body, job);
    std::string prompt;
    if (api == Api::Completion) {
      const json* p = field(body, "prompt", Kind::String);
      if (!p) throw ApiError{400, "'prompt' is required (a string)", "prompt", "missing_field"};
      prompt = *p;
      job.request.stop.max_tokens = value<int64_t>(body, "max_tokens", Kind::Integer, 16);
      const int64_t n = value<int64_t>(body, "logprobs", Kind::Integer, -1);
      job.logprobs = n >= 0;
      job.request.sampling.logprobs = int(std::max<int64_t>(n, 0));
      if (value<bool>(body, "echo", Kind::Bool, false)) {
        if (job.logprobs) throw ApiError{400, "echo with logprobs is not supported yet", "echo", "unsupported_value"};
        job.echo_text = prompt;
      }
      job.request.prompt = s.tokenizer_.encode(prompt, true);  // BOS as Hugging Face adds it
    } else {
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
      job.request.prompt = s.tokenizer_.encode(tmpl.render(messages), false);
      // The assistant's end of turn ends the answer when it is one token.
      const auto end = s.tokenizer_.encode(tmpl.end_of_turn(), false);
      if (end.size() == 1) job.request.stop.stop_ids.push_back(end[0]);
      const json* max = field(body, "max_completion_tokens", Kind::Integer);
      if (!max) max = field(body, "max_tokens", Kind::Integer);
      job.request.stop.max_tokens = max ? max->get<int64_t>() : -1;  // -1: until the context is full
      job.logprobs = value<bool>(body, "logprobs", Kind::Bool, false);
      job.request.sampling.logprobs = job.logprobs ? int(value<int64_t>(body, "top_logprobs", Kind::Integer, 0)) : 0;
    }
    if (job.request.stop.max_tokens < 1)
      throw ApiError{400, "'max_tokens' must be at least 1", "max_tokens", "invalid_value"};
    job.text_offset = job.echo_text.size();
    return job;
  }

  void generate(const httplib::Request& req, httplib::Response& res, Api api) const {
    try {
      Job job = parse(req, api);
      if (s.in_server_.fetch_add(1) >= s.opt_.max_queue) {
        --s.in_server_;
        throw ApiError{429, fmt::format("the server holds {} requests already (--max-queue): retry later", s.opt_.max_queue),
                       "", "queue_full"};
      }
      auto slot = std::make_shared<QueueSlot>(s.in_server_);
      std::shared_ptr<Channel> ch = s.submit(job.request);
      if (!job.stream) {
        std::vector<OutputEvent> events;
        while (events.empty() || events.back().finish == FinishReason::None) {
          std::unique_lock l(ch->mu);
          ch->cv.wait(l, [&] { return !ch->events.empty(); });
          for (auto& ev : ch->events) events.push_back(std::move(ev));
          ch->events.clear();
        }
        if (events.back().finish == FinishReason::Abort)
          throw ApiError{503, "the request was aborted: the server is stopping or its engine failed", "", "aborted"};
        res.set_content(job.answer(events, s.tokenizer_).dump(), "application/json");
        return;
      }
      auto state = std::make_shared<Job>(std::move(job));
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider(
          "text/event-stream", [this, slot, ch, state, started = false](size_t, httplib::DataSink& sink) mutable {
            auto send = [&](const std::string& text) { return text.empty() || sink.write(text.data(), text.size()); };
            // A client gone mid-stream: its request ends and frees its pages.
            auto client_left = [&] {
              ++s.metrics_.client_disconnects;
              s.abort(ch);
            };
            if (!started && !send(state->stream_start())) return client_left(), false;
            started = true;
            auto last_write = std::chrono::steady_clock::now();
            while (true) {
              std::deque<OutputEvent> events;
              {
                std::unique_lock l(ch->mu);
                ch->cv.wait_for(l, std::chrono::milliseconds(50), [&] { return !ch->events.empty(); });
                events.swap(ch->events);
              }
              // A quiet stream says it is alive now and then (an SSE comment): writing is how a
              // client that left is found, since httplib 0.11 cannot see a closed socket otherwise.
              if (events.empty()) {
                if (std::chrono::steady_clock::now() - last_write < kKeepAlive) continue;
                if (!send(": keep-alive\n\n")) return client_left(), false;
                last_write = std::chrono::steady_clock::now();
              }
              for (const auto& ev : events) {
                if (!send(state->stream_event(ev, s.tokenizer_))) return client_left(), false;
                last_write = std::chrono::steady_clock::now();
                if (ev.finish != FinishReason::None) {
                  sink.done();
                  return true;
                }
              }
            }
          },
          // A stream httplib gave up on (the client left before it began) ends its request too.
          [this, ch](bool success) {
            if (!success) s.abort(ch);
          });
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const Error& e) {  // the request's text, template or parameters, as the engine checks them
      send_error(res, {400, e.what(), "", "invalid_request"});
    }
  }
};

Server::Server(Engine& engine, const Tokenizer& tokenizer, ServerOptions opt)
    : engine_(engine), tokenizer_(tokenizer), opt_(std::move(opt)), http_(std::make_unique<httplib::Server>()) {
  const int threads = opt_.http_threads;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
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
  http_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(R"({"status":"ok"})", "application/json");
  });
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_text(metrics_), "text/plain; version=0.0.4");
  });
  engine_thread_ = std::thread([this] { engine_loop(); });
}

Server::~Server() { stop(); }

int Server::bind(const std::string& host, int port) {
  // httplib 0.11 listens with a backlog of 5, which drops connections that arrive together: the
  // socket is kept to listen again with the system's largest backlog.
  auto listening = std::make_shared<int>(-1);
  http_->set_socket_options([listening](socket_t sock) {
    httplib::default_socket_options(sock);
    *listening = sock;
  });
  const int bound = port == 0 ? http_->bind_to_any_port(host) : (http_->bind_to_port(host, port) ? port : -1);
  check(bound > 0, "serve", "cannot listen on {}:{}", host, port);
  check(::listen(*listening, SOMAXCONN) == 0, "serve", "cannot listen on {}:{} with a backlog of {}", host, port, SOMAXCONN);
  return bound;
}

void Server::listen() { http_->listen_after_bind(); }

void Server::stop() {
  {
    std::lock_guard l(queue_mu_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  if (engine_thread_.joinable()) engine_thread_.join();  // it aborts what runs: the handlers answer
  http_->stop();
}

std::unique_lock<std::mutex> Server::hold_engine() {
  ++hold_requests_;
  std::unique_lock hold(engine_mu_);
  --hold_requests_;
  return hold;
}

std::shared_ptr<Channel> Server::submit(Request request) {
  auto ch = std::make_shared<Channel>();
  {
    std::lock_guard l(queue_mu_);
    check(!stopping_, "serve", "the server is shutting down");
    ++metrics_.waiting;
    pending_.emplace_back(std::move(request), ch);
  }
  queue_cv_.notify_all();
  std::unique_lock l(ch->mu);
  ch->cv.wait(l, [&] { return ch->submitted || ch->refused; });
  if (ch->refused) {
    --metrics_.waiting;
    throw Error(*ch->refused);
  }
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
  // Events go to the handler; the counts /metrics shows follow them.
  auto sink_for = [this](std::shared_ptr<Channel> ch) {
    return [this, ch](const OutputEvent& ev) {
      if (!ch->started) {
        ch->started = true;
        --metrics_.waiting;
        ++metrics_.running;
      }
      metrics_.generated_tokens += ev.token.id >= 0;
      if (ev.finish != FinishReason::None) {
        --metrics_.running;
        ++(ev.finish == FinishReason::Abort ? metrics_.aborted : metrics_.finished);
        active_.erase(ch);
      }
      std::lock_guard l(ch->mu);
      ch->events.push_back(ev);
      ch->cv.notify_all();
    };
  };
  auto answer = [](Channel& ch, std::optional<std::string> refused) {
    std::lock_guard l(ch.mu);
    ch.submitted = !refused;
    ch.refused = std::move(refused);
    ch.cv.notify_all();
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
      if (active_.count(ch)) engine_.abort(ch->id);
    for (auto& [request, ch] : pending) {
      if (stopping) {
        answer(*ch, "the server is shutting down");
        continue;
      }
      try {
        const int64_t prompt = int64_t(request.prompt.size());
        ch->id = engine_.submit(std::move(request), sink_for(ch));
        active_.insert(ch);
        metrics_.prompt_tokens += prompt;
        answer(*ch, std::nullopt);
      } catch (const Error& e) {
        answer(*ch, e.what());
      }
    }
    if (stopping)
      for (const auto& ch : std::vector(active_.begin(), active_.end())) engine_.abort(ch->id);
    else if (!active_.empty())
      try {
        engine_.step();
      } catch (const std::exception& e) {  // a bug, not a request's fault: its requests end, the server goes on
        std::fprintf(stderr, "nibble serve: the engine failed (%s): aborting its %zu requests\n", e.what(), active_.size());
        for (const auto& ch : std::vector(active_.begin(), active_.end())) engine_.abort(ch->id);
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
