// nibble bench-serve --url URL: a serving benchmark over HTTP, against `nibble serve` or any
// OpenAI-compatible server. The requests are `nibble bench`'s (engine/bench_load.h: the same seed
// gives the same prompts, lengths and Poisson arrivals), sent as streaming /v1/completions with
// token-id prompts, greedy, and `ignore_eos` so that each generates its requested length; per
// arrival rate it reports requests/s, output tokens/s, TTFT, TPOT and inter-token latency.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <regex>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "nibble/core/progress.h"
#include "nibble/io/output_file.h"
#include "tools/bench_common.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
using json = nlohmann::json;

struct BenchServeArgs {
  std::string url, api_key, model;
  int64_t vocab_size = 32000;
  double timeout_s = 600;
  BenchLoadOptions load;
};

// Where the server is: scheme://host[:port] for the client, and a path prefix for the routes.
struct Target {
  std::string origin, prefix, api_key, model;
  double timeout_s = 600;
  httplib::Client client() const {
    httplib::Client c(origin);
    c.set_connection_timeout(10);
    c.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::duration<double>(timeout_s)));
    c.set_write_timeout(10);
    if (!api_key.empty()) c.set_bearer_token_auth(api_key);
    return c;
  }
};

// The message of an OpenAI-shaped error body, else the body's first line.
std::string error_message(int status, const std::string& body) {
  const json j = json::parse(body, nullptr, false);
  std::string what = j.is_object() && j.contains("error") && j["error"].is_object() && j["error"].contains("message")
                         ? j["error"]["message"].dump()
                         : body.substr(0, body.find('\n'));
  return fmt::format("HTTP {}: {}", status, what);
}

// Checks the URL and that a server answers there, and names the model to ask for (--model, else
// the first the server lists).
Target connect(const BenchServeArgs& a) {
  std::smatch m;
  check(std::regex_match(a.url, m, std::regex(R"(^(https?://[^/?#]+)(/[^?#]*)?$)")), "--url",
        "'{}' is not an http:// or https:// URL", a.url);
  Target t{m[1], m[2], a.api_key, a.model, a.timeout_s};
  while (!t.prefix.empty() && t.prefix.back() == '/') t.prefix.pop_back();
  httplib::Client c = t.client();
  check(c.is_valid(), "--url", "cannot make a client for '{}' (https needs cpp-httplib with OpenSSL)", a.url);
  const httplib::Result res = c.Get(t.prefix + "/v1/models");
  check(bool(res), "--url", "cannot reach {}: {} error (is the server running there?)", a.url,
        httplib::to_string(res.error()));
  check(res->status == 200, "--url", "GET {}/v1/models answered {}", a.url, error_message(res->status, res->body));
  if (t.model.empty()) {
    const json models = json::parse(res->body, nullptr, false);
    check(models.is_object() && models.contains("data") && models["data"].is_array() && !models["data"].empty() &&
              models["data"][0].contains("id") && models["data"][0]["id"].is_string(),
          "--url", "GET {}/v1/models lists no model; name one with --model", a.url);
    t.model = models["data"][0]["id"];
  }
  return t;
}

// One request's timeline (seconds from the run's start) and what the server said it did.
struct Outcome {
  double sent = 0;
  std::vector<double> chunks;  // when each chunk with a choice (a token) arrived
  int64_t prompt_tokens = 0, output_tokens = 0;
  std::string error;  // empty: the stream ended with its usage and [DONE]
};

// Sends one streaming completion and reads its server-sent events as they come.
void stream_completion(const Target& t, const SyntheticRequest& r, std::chrono::steady_clock::time_point t0,
                       Outcome& out) {
  const json body = {{"model", t.model},
                     {"prompt", r.prompt},
                     {"max_tokens", r.output_len},
                     {"temperature", 0},
                     {"ignore_eos", true},
                     {"stream", true},
                     {"stream_options", {{"include_usage", true}}}};
  httplib::Request req;
  req.method = "POST";
  req.path = t.prefix + "/v1/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  std::string buffer, raw;
  bool done = false, usage = false;
  // Each event is "data: PAYLOAD\n\n"; lines starting with ':' are keep-alive comments.
  auto take_event = [&](const std::string& event) {
    if (event.rfind("data: ", 0) != 0) return;
    const std::string payload = event.substr(6);
    if (payload == "[DONE]") {
      done = true;
      return;
    }
    const json j = json::parse(payload, nullptr, false);
    if (!j.is_object()) {
      out.error = "a stream event is not JSON: " + payload.substr(0, 80);
    } else if (j.contains("error")) {
      out.error = "the stream sent an error: " + j["error"].dump();
    } else {
      if (j.contains("choices") && j["choices"].is_array() && !j["choices"].empty()) out.chunks.push_back(seconds_since(t0));
      if (j.contains("usage") && j["usage"].is_object()) {
        usage = true;
        out.prompt_tokens = j["usage"].value("prompt_tokens", int64_t(0));
        out.output_tokens = j["usage"].value("completion_tokens", int64_t(0));
      }
    }
  };
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    if (raw.size() < 4096) raw.append(data, std::min(n, 4096 - raw.size()));  // an error body, for the message
    buffer.append(data, n);
    for (size_t end; (end = buffer.find("\n\n")) != std::string::npos; buffer.erase(0, end + 2))
      take_event(buffer.substr(0, end));
    return out.error.empty();
  };
  httplib::Client c = t.client();
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  out.sent = seconds_since(t0);
  if (!c.send(req, res, err)) {
    if (out.error.empty()) out.error = httplib::to_string(err);
  } else if (res.status != 200) {
    out.error = error_message(res.status, raw);
  } else if (out.error.empty() && !(done && usage)) {
    out.error = done ? "the stream had no usage chunk" : "the stream ended before [DONE]";
  }
}

// One run at one arrival rate: every request on its own thread, started at its arrival time.
nlohmann::ordered_json run_rate(const BenchServeArgs& a, const Target& t, double rate) {
  const std::vector<SyntheticRequest> load = synthetic_requests(a.load.spec(rate, a.vocab_size, a.load.max_len));
  std::vector<Outcome> outcomes(load.size());
  std::vector<std::thread> clients;
  std::mutex progress_mu;
  int64_t finished = 0;
  Progress progress(rate > 0 ? fmt::format("bench-serve at {:g} req/s", rate) : "bench-serve", a.load.num_prompts, "requests");
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < load.size(); ++i) {
    std::this_thread::sleep_for(std::chrono::duration<double>(load[i].arrival_s - seconds_since(t0)));
    clients.emplace_back([&, i] {
      stream_completion(t, load[i], t0, outcomes[i]);
      std::lock_guard l(progress_mu);
      progress.update(++finished);
    });
  }
  for (std::thread& c : clients) c.join();
  const double wall = seconds_since(t0);
  progress.finish();

  int64_t completed = 0, prompt_tokens = 0, output_tokens = 0, requested_prompt = 0, requested_output = 0;
  std::vector<double> ttft, tpot, itl;
  const Outcome* first_error = nullptr;
  for (size_t i = 0; i < load.size(); ++i) {
    const Outcome& o = outcomes[i];
    requested_prompt += int64_t(load[i].prompt.size());
    requested_output += load[i].output_len;
    if (!o.error.empty()) {
      if (!first_error) first_error = &o;
      continue;
    }
    ++completed;
    prompt_tokens += o.prompt_tokens;
    output_tokens += o.output_tokens;
    if (o.chunks.empty()) continue;
    ttft.push_back(o.chunks.front() - o.sent);
    if (o.output_tokens > 1) tpot.push_back((o.chunks.back() - o.chunks.front()) / double(o.output_tokens - 1));
    for (size_t k = 1; k < o.chunks.size(); ++k) itl.push_back(o.chunks[k] - o.chunks[k - 1]);
  }
  const int64_t errors = int64_t(load.size()) - completed;
  if (first_error)
    std::fprintf(stderr, "bench-serve: %lld of %zu requests failed; the first: %s\n", static_cast<long long>(errors),
                 load.size(), first_error->error.c_str());
  nlohmann::ordered_json j = {
      {"url", a.url},
      {"model", t.model},
      {"num_prompts", a.load.num_prompts},
      {"dist", a.load.dist},
      {"rate", rate},
      {"completed", completed},
      {"errors", errors},
      {"duration_s", wall},
      {"requested_prompt_tokens", requested_prompt},
      {"prompt_tokens", prompt_tokens},
      {"requested_output_tokens", requested_output},
      {"output_tokens", output_tokens},
      {"requests_per_s", double(completed) / wall},
      {"output_tokens_per_s", double(output_tokens) / wall},
  };
  add_latencies(j, "ttft", ttft);
  add_latencies(j, "tpot", tpot);
  add_latencies(j, "itl", itl);
  return j;
}

void run_bench_serve(const BenchServeArgs& a) {
  if (!a.load.plot.empty()) check_load_curve_target(a.load.plot);
  const Target t = connect(a);
  std::vector<nlohmann::ordered_json> runs;
  for (double rate : a.load.rates) runs.push_back(run_rate(a, t, rate));
  print_runs(runs, a.load.json, a.load.csv);  // first: a failing plot must not take the results with it
  if (!a.load.plot.empty()) write_load_curve(runs, "nibble bench-serve: " + t.model + " at " + a.url, a.load.plot);
}
}  // namespace

void add_bench_serve_command(CLI::App& app) {
  auto a = std::make_shared<BenchServeArgs>();
  a->load.rates = {1};
  CLI::App* cmd = app.add_subcommand(
      "bench-serve", "Benchmark an OpenAI-compatible server (nibble serve) over HTTP: throughput, TTFT, TPOT, ITL");
  cmd->add_option("--url", a->url, "the server's address, e.g. http://127.0.0.1:8080")->required();
  cmd->add_option("--api-key", a->api_key, "sent as 'Authorization: Bearer KEY'");
  cmd->add_option("--model", a->model, "the model to ask for; default: the first the server lists");
  a->load.add_to(cmd);
  cmd->add_option("--vocab-size", a->vocab_size, "prompt token ids are drawn below this (at most the model's vocabulary)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(1), int64_t(1) << 31));
  cmd->add_option("--timeout", a->timeout_s, "seconds a request may wait for its next bytes")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([a] {
    check(!(a->load.json && a->load.csv), "nibble bench-serve", "--json and --csv are exclusive");
    run_bench_serve(*a);
  });
}

}  // namespace nibble::cli
