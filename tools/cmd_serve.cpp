// nibble serve -m MODEL: the OpenAI-compatible HTTP server (src/nibble/server) over one Engine.
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <pthread.h>

#include "nibble/core/progress.h"
#include "nibble/engine/engine.h"
#include "nibble/server/server.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct ServeArgs {
  std::string model, tokenizer, host = "127.0.0.1", chat_template;
  int port = 8080;
  int64_t max_batch_tokens = 4096;
  bool no_prefix_caching = false;
  server::ServerOptions server;
  DeviceOptions device;
};

void run_serve(ServeArgs a) {
  // A template the model names but nibble cannot render stops here, before anything loads.
  if (!a.chat_template.empty())
    a.server.chat_template = server::ChatTemplate::from_option(a.chat_template);
  else if (std::filesystem::is_directory(a.model))
    a.server.chat_template = server::ChatTemplate::from_model(a.model);
  if (a.server.model_name.empty()) a.server.model_name = std::filesystem::path(a.model).filename().string();
  warn_if_synthetic(a.model);
  server::check_can_listen(a.host, a.port);  // a taken port fails now, not after loading
  const auto t0 = std::chrono::steady_clock::now();
  auto [model, tok] = load_model_and_tokenizer(a.model, a.tokenizer);
  if (a.server.chat_template && !a.chat_template.empty()) {  // a template by name or file: the model's own BOS/EOS
    const int32_t bos = tok.bos_id(), eos = tok.eos_ids().empty() ? -1 : tok.eos_ids()[0];
    a.server.chat_template->use_tokens_of(bos < 0 ? "" : tok.decode(std::span(&bos, 1)),
                                          eos < 0 ? "" : tok.decode(std::span(&eos, 1)));
  }
  const int64_t context = model->config().max_position_embeddings;
  auto exec = a.device.make(*model, context, a.max_batch_tokens);
  std::fprintf(stderr, "nibble serve: model loaded in %.1f s\n", seconds_since(t0));
  Engine engine(*exec, &tok, {.max_batch_tokens = a.max_batch_tokens, .prefix_caching = !a.no_prefix_caching});

  // SIGINT and SIGTERM stop the server from a thread of their own (every thread made after this
  // inherits the blocked mask, so only that one takes them): the first drains it (new requests
  // get 503, running ones finish), a second stops it at once.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  server::Server srv(engine, tok, a.server);
  const int port = srv.bind(a.host, a.port);
  std::atomic<bool> listening{true};
  std::thread watcher([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    if (!listening) return;
    std::fprintf(stderr, "nibble serve: draining (finishing the running requests; a second signal stops now)\n");
    std::thread drainer([&] { srv.drain(); });
    sigwait(&signals, &sig);
    srv.stop();
    drainer.join();
  });
  std::fprintf(stderr, "nibble serve: '%s' on http://%s:%d (chat template: %s)\n", a.server.model_name.c_str(),
               a.host.c_str(), port,
               a.server.chat_template ? server::chat_format_name(a.server.chat_template->format) : "none");
  srv.listen();
  listening = false;
  pthread_kill(watcher.native_handle(), SIGTERM);  // listen() ended: let the watcher go
  watcher.join();
}
}  // namespace

void add_serve_command(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  a->server.model_name.clear();
  CLI::App* cmd = app.add_subcommand("serve", "Serve a model over an OpenAI-compatible HTTP API (completions, chat)");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory or packed nibble .safetensors")->required();
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_option("--host", a->host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", a->port, "port to listen on; 0 = any free one")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--api-key", a->server.api_key, "ask every request but /health for 'Authorization: Bearer KEY'");
  cmd->add_option("--served-model-name", a->server.model_name, "the model's id in the API; default: the model's file name");
  cmd->add_option("--max-body", a->server.max_body, "largest request body in bytes (413 past it)")
      ->capture_default_str()
      ->check(CLI::Range(size_t(1), size_t(1) << 30));
  cmd->add_option("--max-queue", a->server.max_queue, "most requests in the server at once (429 past it)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  cmd->add_option("--http-threads", a->server.http_threads, "connections handled at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--chat-template", a->chat_template,
                  "llama-2, llama-3, mistral, chatml, or a file (a Jinja template or tokenizer_config.json) in one of those formats; "
                  "default: recognised in the model's tokenizer_config.json");
  cmd->add_option("--max-batch-tokens", a->max_batch_tokens, "tokens one engine step carries")->capture_default_str();
  cmd->add_flag("--no-prefix-caching", a->no_prefix_caching, "do not share prompt pages between requests");
  a->device.add_to(cmd);
  cmd->callback([a] { run_serve(*a); });
}

}  // namespace nibble::cli
