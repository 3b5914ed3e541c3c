// nibble bench -m MODEL: the serving engine offline (no HTTP). Requests of random token ids whose
// prompt and output lengths are fixed or drawn from Atom's distribution (its
// e2e/punica-atom/benchmarks/bench_textgen.py), all at once or as Poisson arrivals at one rate or a
// sweep of rates (the model loaded once); reports throughput, TTFT and TPOT percentiles, peak KV
// pages, preemptions and prefix-cache hits, and with --plot the load curve (tokens/s against TPOT).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/core/progress.h"
#include "nibble/engine/bench_load.h"
#include "nibble/engine/engine.h"
#include "nibble/io/output_file.h"
#include "tools/bench_report.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct BenchArgs {
  std::string model;
  int num_prompts = 100;
  int64_t prompt_len = 128, output_len = 128, max_len = 2048, max_batch_tokens = 4096;
  std::string dist = "fixed";
  std::vector<double> rates = {0};  // requests per second, one run each; 0 = all at once
  std::string plot;                 // PNG of throughput against TPOT over the rates
  uint64_t seed = 0;
  bool no_prefix_caching = false, json = false, csv = false;
  DeviceOptions device;
};

// One run at one arrival rate, on a fresh engine over `exec` (whose pool the last engine emptied).
nlohmann::ordered_json run_rate(const BenchArgs& a, Executor& exec, double rate) {
  const int64_t context = exec.config().max_position_embeddings, vocab = exec.config().vocab_size;
  const int64_t maxlen = std::min(a.max_len, context);
  Engine engine(exec, nullptr, {.max_batch_tokens = a.max_batch_tokens, .prefix_caching = !a.no_prefix_caching});

  const std::vector<SyntheticRequest> load = synthetic_requests({.num_prompts = a.num_prompts,
                                                                 .dist = a.dist,
                                                                 .prompt_len = a.prompt_len,
                                                                 .output_len = a.output_len,
                                                                 .max_len = maxlen,
                                                                 .vocab = vocab,
                                                                 .rate = rate,
                                                                 .seed = a.seed});
  struct Timing {
    double arrival = 0, first = -1, last = 0;
    int64_t tokens = 0;
  };
  std::vector<Timing> t(load.size());
  const auto t0 = std::chrono::steady_clock::now();
  int64_t output_tokens = 0, completed = 0, refused = 0;
  Progress progress(rate > 0 ? fmt::format("bench at {:g} req/s", rate) : "bench", a.num_prompts, "requests");
  size_t next = 0;
  while (true) {
    const double now = seconds_since(t0);
    for (; next < load.size() && load[next].arrival_s <= now; ++next) {
      t[next].arrival = rate > 0 ? load[next].arrival_s : now;
      try {
        Request r{.prompt = load[next].prompt, .sampling = {}, .stop = {.max_tokens = load[next].output_len, .ignore_eos = true}};
        engine.submit(std::move(r), [&, i = next](const OutputEvent& ev) {
          const double at = seconds_since(t0);
          if (t[i].first < 0) t[i].first = at;
          t[i].last = at;
          t[i].tokens += ev.token.id >= 0;
          output_tokens += ev.token.id >= 0;
          if (ev.finish != FinishReason::None) progress.update(++completed);
        });
      } catch (const Error& e) {
        if (refused++ == 0) std::fprintf(stderr, "bench: request %zu refused: %s\n", next, e.what());
      }
    }
    if (engine.step()) continue;
    if (next == load.size()) break;
    std::this_thread::sleep_for(std::chrono::duration<double>(load[next].arrival_s - seconds_since(t0)));
  }
  const double wall = seconds_since(t0);
  progress.finish();

  std::vector<double> ttft, tpot;
  for (const Timing& x : t) {
    if (x.first < 0) continue;
    ttft.push_back(x.first - x.arrival);
    if (x.tokens > 1) tpot.push_back((x.last - x.first) / double(x.tokens - 1));
  }
  const SchedulerStats& s = engine.stats();
  nlohmann::ordered_json j = {
      {"model", a.model},
      {"device", exec.device_name()},
      {"num_prompts", a.num_prompts},
      {"dist", a.dist},
      {"rate", rate},
      {"completed", completed},
      {"refused", refused},
      {"duration_s", wall},
      {"output_tokens", output_tokens},
      {"output_tokens_per_s", double(output_tokens) / wall},
      {"requests_per_s", double(completed) / wall},
      {"max_batch_tokens", a.max_batch_tokens},
      {"kv_pages", exec.kv().capacity_tokens() / kKVPageTokens},
      {"peak_pages", s.peak_pages},
      {"preemptions", s.preemptions},
      {"prefix_hit_tokens", s.prefix_hit_tokens},
      {"computed_tokens", s.computed_tokens},
  };
  add_latencies(j, "ttft", ttft);
  add_latencies(j, "tpot", tpot);
  return j;
}

void run_bench(const BenchArgs& a) {
  const std::filesystem::path inputs[] = {a.model};
  if (!a.plot.empty()) check_output_path(a.plot, inputs);  // before the work, not after it
  auto model = Model::load(a.model);
  auto exec = a.device.make(*model, model->config().max_position_embeddings, a.max_batch_tokens);
  std::vector<nlohmann::ordered_json> runs;
  for (double rate : a.rates) runs.push_back(run_rate(a, *exec, rate));
  if (!a.plot.empty()) write_load_curve(runs, "nibble bench: " + a.model, a.plot, inputs);
  print_runs(runs, a.json, a.csv);
}
}  // namespace

void add_bench_command(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand("bench", "Benchmark the serving engine offline: throughput, TTFT, TPOT");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory or packed nibble .safetensors")->required();
  cmd->add_option("--num-prompts", a->num_prompts, "requests to run")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--prompt-len", a->prompt_len, "prompt tokens of each request (--dist fixed)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--output-len", a->output_len, "tokens each request generates (--dist fixed)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dist", a->dist, "fixed: --prompt-len/--output-len; atom: Atom's lognormal prompts, uniform totals")
      ->capture_default_str()
      ->check(CLI::IsMember({"fixed", "atom"}));
  cmd->add_option("--max-len", a->max_len, "--dist atom: longest prompt + output (capped by the model's context)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(3), int64_t(1) << 30));
  cmd->add_option("--rate", a->rates,
                  "Poisson arrivals, requests per second; 0 = all at once; a list (1,2,4) sweeps the load, one run "
                  "each over the model loaded once")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--plot", a->plot, "write a PNG of output tokens/s against mean TPOT, one point per --rate");
  cmd->add_option("--max-batch-tokens", a->max_batch_tokens, "tokens one step may carry (decode + prefill chunks)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", a->seed, "seed of the lengths, prompts and arrivals")->capture_default_str();
  cmd->add_flag("--no-prefix-caching", a->no_prefix_caching, "do not share cached prompt pages between requests");
  a->device.add_to(cmd);
  cmd->add_flag("--json", a->json, "print one JSON object (progress stays on stderr)");
  cmd->add_flag("--csv", a->csv, "print a CSV header and row");
  cmd->callback([a] {
    check(!(a->json && a->csv), "nibble bench", "--json and --csv are exclusive");
    run_bench(*a);
  });
}

}  // namespace nibble::cli
