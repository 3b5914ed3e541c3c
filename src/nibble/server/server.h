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
  int64_t max_queue = 256;            // requests in the server at once (waiting or running); more get 429
  int http_threads = 64;              // handler threads: each holds one connection
  std::optional<ChatTemplate> chat_template;  // none: /v1/chat/completions answers 400
};

// What /metrics reports; written by the engine thread.
struct ServerMetrics {
  std::atomic<int64_t> waiting{0}, running{0};  // submitted requests without / with a first token
  std::atomic<int64_t> kv_pages_used{0}, kv_pages_free{0};
  std::atomic<int64_t> prompt_tokens{0}, generated_tokens{0}, prefix_hit_tokens{0};
  std::atomic<int64_t> finished{0}, aborted{0};
  std::atomic<int64_t> client_disconnects{0};  // streams whose client left; written by the handlers
};

struct Channel;

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

  // While the returned lock is held the engine does not step: requests queue up (tests use it to
  // fill the queue or hold a stream still).
  std::unique_lock<std::mutex> hold_engine();
  const ServerMetrics& metrics() const { return metrics_; }

 private:
  friend struct Handlers;
  // Queues a request for the engine thread and waits until it is submitted; throws nibble::Error
  // with the engine's reason when it is refused.
  std::shared_ptr<Channel> submit(Request request);
  void abort(const std::shared_ptr<Channel>& channel);
  void engine_loop();

  Engine& engine_;
  const Tokenizer& tokenizer_;
  ServerOptions opt_;
  std::unique_ptr<httplib::Server> http_;
  ServerMetrics metrics_;
  std::atomic<int64_t> in_server_{0};  // requests admitted by a handler and not yet answered
  std::atomic<int64_t> next_id_{0};    // response ids

  std::mutex queue_mu_;  // guards the two queues and stopping_
  std::condition_variable queue_cv_;
  std::deque<std::pair<Request, std::shared_ptr<Channel>>> pending_;
  std::vector<std::shared_ptr<Channel>> aborts_;
  bool stopping_ = false;
  std::mutex engine_mu_;  // held by the engine thread while it touches the engine
  std::atomic<int> hold_requests_{0};  // hold_engine() callers waiting: the engine thread lets them in
  std::set<std::shared_ptr<Channel>> active_;  // submitted and unfinished; engine thread only
  std::thread engine_thread_;
};

}  // namespace nibble::server
