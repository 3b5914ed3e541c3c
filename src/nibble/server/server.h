// `nibble serve`: an OpenAI-compatible HTTP server (cpp-httplib) over one Engine.
// One engine thread owns the engine: it takes the requests the HTTP handler threads queue, submits
// them, and runs step() while any is unfinished; the engine's events go back to each handler
// through its own channel, streamed as server-sent events or gathered into one answer.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "nibble/engine/engine.h"
#include "nibble/server/chat_template.h"
#include "nibble/tokenizer/tokenizer.h"

namespace httplib {
class Server;
}

namespace nibble::server {

struct ServerOptions {
  std::string model_name = "nibble";  // the id /v1/models lists and requests must name (when they name one)
  std::string api_key;                // empty: no key asked
  size_t max_body = 1 << 20;          // bytes of a request body
  // Generation requests in the server at once: waiting for a handler thread, for the engine, or
  // running; more get 429.
  int64_t max_queue = 256;
  int http_threads = 64;              // handler threads: each holds one connection
  std::optional<ChatTemplate> chat_template;  // none: /v1/chat/completions answers 400
};

// A Prometheus histogram of seconds (cumulative buckets, sum, count); thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1) {}
  void observe(double seconds);
  // The histogram's lines: NAME_bucket{le=...}, NAME_sum, NAME_count, after its HELP and TYPE.
  std::string text(const char* name, const char* help) const;
  int64_t count() const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // per bucket, not cumulative; the last is +Inf's
  double sum_ = 0;
};

// What /metrics reports; written by the engine thread unless said otherwise.
struct ServerMetrics {
  std::atomic<int64_t> waiting{0}, running{0};  // engine requests (one per choice) without / with a first token
  std::atomic<int64_t> queued_connections{0};   // connections waiting for a handler thread; the pool's
  std::atomic<int64_t> kv_pages_used{0}, kv_pages_free{0};
  bool kv_pool_bounded = true;  // the CPU pool without --kv-pages has no bound: no free pages to report
  std::atomic<int64_t> prompt_tokens{0}, generated_tokens{0}, prefix_hit_tokens{0};
  std::atomic<int64_t> finished{0}, aborted{0};
  std::atomic<int64_t> client_disconnects{0};  // answers whose client left first; written by the handlers
  std::atomic<int64_t> rejected{0};            // 429 and 503 answers; written by the handlers
  // Per engine request: arrival to first token, between tokens after the first, arrival to the end
  // (requests that finished with stop or length).
  Histogram ttft{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}};
  Histogram tpot{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}};
  Histogram e2e{{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}};
};

struct Channel;
class HandlerPool;

// Throws nibble::Error saying why when `host`:`port` cannot be bound now (port 0, any free port: never).
// `nibble serve` asks before it loads the model, so that a taken port or a wrong address fails in a
// moment rather than after minutes of loading; Server::bind binds for real once the model is up.
void check_can_listen(const std::string& host, int port);

class Server {
 public:
  Server(Engine& engine, const Tokenizer& tokenizer, ServerOptions opt);
  ~Server();  // stop()s
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds `host`:`port` (0: any free port) and returns the port; throws nibble::Error when it cannot.
  int bind(const std::string& host, int port);
  // Answers requests until stop(); call after bind().
  void listen();
  // Aborts the running requests and ends listen(); safe from any thread.
  void stop();
  // A graceful stop (SIGTERM): new generation requests get 503 while the admitted ones run to
  // their end and are answered; then stop(). A stop() meanwhile (a second signal) cuts it short.
  void drain();

  // While the returned lock is held the engine does not step: requests queue up (tests use it to
  // fill the queue or hold a stream still).
  std::unique_lock<std::mutex> hold_engine();
  const ServerMetrics& metrics() const { return metrics_; }

 private:
  friend struct Handlers;
  // Queues an HTTP request's engine requests (its choices) for the engine thread and waits until
  // they are submitted; throws nibble::Error with the engine's reason when one is refused (then
  // none runs).
  std::shared_ptr<Channel> submit(std::vector<Request> requests);
  void abort(const std::shared_ptr<Channel>& channel);
  void engine_loop();

  Engine& engine_;
  const Tokenizer& tokenizer_;
  ServerOptions opt_;
  std::unique_ptr<httplib::Server> http_;
  ServerMetrics metrics_;
  std::atomic<int64_t> in_server_{0};  // requests admitted by a handler and not yet answered
  std::atomic<int64_t> next_id_{0};    // response ids
  std::atomic<bool> draining_{false};

  std::mutex stop_mu_;   // one stop() at a time (drain's and a second signal's)
  std::mutex queue_mu_;  // guards the two queues and stopping_
  std::condition_variable queue_cv_;
  std::deque<std::pair<std::vector<Request>, std::shared_ptr<Channel>>> pending_;
  std::vector<std::shared_ptr<Channel>> aborts_;
  bool stopping_ = false;
  std::mutex engine_mu_;  // held by the engine thread while it touches the engine
  std::atomic<int> hold_requests_{0};  // hold_engine() callers waiting: the engine thread lets them in
  std::set<std::shared_ptr<Channel>> active_;  // submitted and unfinished; engine thread only
  std::thread engine_thread_;
};

}  // namespace nibble::server
