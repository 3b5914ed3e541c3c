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
#include "nibble/engine/engine.h"
#include "nibble/io/output_file.h"
#include "tools/bench_common.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct BenchArgs {
  std::string model;
  int64_t max_batch_tokens = 4096;
  bool no_prefix_caching = false;
  BenchLoadOptions load;
  DeviceOptions device;
};

// One run at one arrival rate, on a fresh engine over `exec` (whose pool the last engine emptied).
nlohmann::ordered_json run_rate(const BenchArgs& a, Executor& exec, double rate) {
  Engine engine(exec, nullptr, {.max_batch_tokens = a.max_batch_tokens, .prefix_caching = !a.no_prefix_caching});

  const std::vector<SyntheticRequest> load =
      synthetic_requests(a.load.spec(rate, exec.config().vocab_size, exec.config().max_position_embeddings));
  struct Timing {
    double arrival = 0, first = -1, last = 0;
    int64_t tokens = 0;
  };
  std::vector<Timing> t(load.size());
  const auto t0 = std::chrono::steady_clock::now();
  int64_t output_tokens = 0, completed = 0, refused = 0;
  Progress progress(rate > 0 ? fmt::format("bench at {:g} req/s", rate) : "bench", a.load.num_prompts, "requests");
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
      {"num_prompts", a.load.num_prompts},
      {"dist", a.load.dist},
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
  // Where the steps' time went (the engine's clock; the rest of the wall time is waiting for arrivals).
  const EngineTimes& et = engine.times();
  j["steps"] = et.steps;
  j["mean_batch"] = et.steps ? double(et.sequences) / double(et.steps) : 0.0;
  j["schedule_s"] = et.schedule_s;
  j["forward_s"] = et.forward_s;
  j["sample_and_stream_s"] = et.after_s;
  add_latencies(j, "ttft", ttft);
  add_latencies(j, "tpot", tpot);
  return j;
}

void run_bench(const BenchArgs& a) {
  const std::filesystem::path inputs[] = {a.model};
  if (!a.load.plot.empty()) check_load_curve_target(a.load.plot, inputs);
  const auto t0 = std::chrono::steady_clock::now();
  auto model = Model::load(a.model);
  const double read_s = seconds_since(t0);
  auto exec = a.device.make(*model, model->config().max_position_embeddings, a.max_batch_tokens);
  // Where a device run's minutes go before the first request (a 7B FP16 load once took ~80 s).
  const double setup_s = seconds_since(t0) - read_s;
  std::fprintf(stderr, "bench: model read in %.1f s, executor ready %.1f s later\n", read_s, setup_s);
  std::vector<nlohmann::ordered_json> runs;
  for (double rate : a.load.rates) {
    runs.push_back(run_rate(a, *exec, rate));
    runs.back()["model_read_s"] = read_s;
    runs.back()["executor_setup_s"] = setup_s;
  }
  print_runs(runs, a.load.json, a.load.csv);  // first: a failing plot must not take the results with it
  if (!a.load.plot.empty()) write_load_curve(runs, "nibble bench: " + a.model, a.load.plot, inputs);
}
}  // namespace

void add_bench_command(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand("bench", "Benchmark the serving engine offline: throughput, TTFT, TPOT");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory or packed nibble .safetensors")->required();
  a->load.add_to(cmd);
  cmd->add_option("--max-batch-tokens", a->max_batch_tokens, "tokens one step may carry (decode + prefill chunks)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--no-prefix-caching", a->no_prefix_caching, "do not share cached prompt pages between requests");
  a->device.add_to(cmd);
  cmd->callback([a] {
    check(!(a->load.json && a->load.csv), "nibble bench", "--json and --csv are exclusive");
    run_bench(*a);
  });
}

}  // namespace nibble::cli
