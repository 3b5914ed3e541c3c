// nibble bench -m MODEL: the serving engine offline (no HTTP). Requests of random token ids whose
// prompt and output lengths are fixed or drawn from Atom's distribution (its
// e2e/punica-atom/benchmarks/bench_textgen.py), all at once or as Poisson arrivals at one rate or a
// sweep of rates (the model loaded once); reports throughput, TTFT and TPOT percentiles, peak KV
// pages, preemptions and prefix-cache hits, and with --plot the load curve (tokens/s against TPOT).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/core/progress.h"
#include "nibble/engine/engine.h"
#include "nibble/io/output_file.h"
#include "tools/commands.h"
#include "tools/plot.h"

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

struct Lengths {
  int64_t prompt, output;
};

// Atom's draw: prompt = lognormal(shape 0.8, loc -1, scale 18) clamped to [1, maxlen - 2];
// total = max(prompt + 2, uniform integer in [0, maxlen)); output = total - prompt.
Lengths atom_lengths(std::mt19937_64& rng, int64_t maxlen) {
  std::normal_distribution<double> z;
  const double p = -1 + 18 * std::exp(0.8 * z(rng));
  const int64_t prompt = std::clamp<int64_t>(int64_t(p), 1, maxlen - 2);
  const int64_t total = std::max(prompt + 2, std::uniform_int_distribution<int64_t>(0, maxlen - 1)(rng));
  return {prompt, total - prompt};
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[size_t(std::llround(q * double(v.size() - 1)))];
}

// One run at one arrival rate, on a fresh engine over `exec` (whose pool the last engine emptied).
nlohmann::ordered_json run_rate(const BenchArgs& a, Executor& exec, double rate) {
  const int64_t context = exec.config().max_position_embeddings, vocab = exec.config().vocab_size;
  const int64_t maxlen = std::min(a.max_len, context);
  Engine engine(exec, nullptr, {.max_batch_tokens = a.max_batch_tokens, .prefix_caching = !a.no_prefix_caching});

  // The requests and their arrival times (seconds from the start).
  std::mt19937_64 rng(a.seed);
  std::exponential_distribution<double> gap(rate > 0 ? rate : 1);
  std::vector<Request> reqs(size_t(a.num_prompts));
  std::vector<double> arrival(reqs.size(), 0);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Lengths len = a.dist == "atom" ? atom_lengths(rng, maxlen) : Lengths{a.prompt_len, a.output_len};
    reqs[i].prompt.resize(size_t(len.prompt));
    for (int32_t& t : reqs[i].prompt) t = int32_t(rng() % uint64_t(vocab));
    reqs[i].stop = {.max_tokens = len.output, .ignore_eos = true};
    if (rate > 0) arrival[i] = (i ? arrival[i - 1] : 0) + gap(rng);
  }

  struct Timing {
    double arrival = 0, first = -1, last = 0;
    int64_t tokens = 0;
  };
  std::vector<Timing> t(reqs.size());
  const auto t0 = std::chrono::steady_clock::now();
  int64_t output_tokens = 0, completed = 0, refused = 0;
  Progress progress(rate > 0 ? fmt::format("bench at {:g} req/s", rate) : "bench", a.num_prompts, "requests");
  size_t next = 0;
  while (true) {
    const double now = seconds_since(t0);
    for (; next < reqs.size() && arrival[next] <= now; ++next) {
      t[next].arrival = rate > 0 ? arrival[next] : now;
      try {
        engine.submit(reqs[next], [&, i = next](const OutputEvent& ev) {
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
    if (next == reqs.size()) break;
    std::this_thread::sleep_for(std::chrono::duration<double>(arrival[next] - seconds_since(t0)));
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
  // Where the steps' time went (the engine's clock; the rest of the wall time is waiting for arrivals).
  const EngineTimes& et = engine.times();
  j["steps"] = et.steps;
  j["mean_batch"] = et.steps ? double(et.sequences) / double(et.steps) : 0.0;
  j["schedule_s"] = et.schedule_s;
  j["forward_s"] = et.forward_s;
  j["sample_and_stream_s"] = et.after_s;
  for (const auto& [name, v] : {std::pair{"ttft", &ttft}, std::pair{"tpot", &tpot}})
    for (const auto& [q, label] : {std::pair{0.5, "p50"}, std::pair{0.9, "p90"}, std::pair{0.99, "p99"}})
      j[fmt::format("{}_{}_ms", name, label)] = 1000 * percentile(*v, q);
  double tpot_sum = 0;
  for (double x : tpot) tpot_sum += x;
  j["tpot_mean_ms"] = tpot.empty() ? 0.0 : 1000 * tpot_sum / double(tpot.size());
  return j;
}

// Output tokens/s against mean TPOT, one point per rate (Atom's figure 11 axes).
std::optional<std::string> draw_load_curve(const std::vector<nlohmann::ordered_json>& runs, const std::string& model) {
  std::string script = "set terminal pngcairo size 800,520 noenhanced\n"
                       "set xlabel 'mean TPOT (ms)'\nset ylabel 'output tokens/s'\nset grid\nset key off\n"
                       "set title " + gnuplot_data_string("nibble bench: " + model) + "\n"
                       "plot '-' using 1:2 with linespoints pointtype 7\n";
  for (const auto& j : runs)
    script += fmt::format("{:.4f} {:.2f}\n", j["tpot_mean_ms"].get<double>(), j["output_tokens_per_s"].get<double>());
  return run_gnuplot(script + "e\n");
}

void run_bench(const BenchArgs& a) {
  const std::filesystem::path inputs[] = {a.model};
  if (!a.plot.empty()) check_output_path(a.plot, inputs);  // before the work, not after it
  auto model = Model::load(a.model);
  auto exec = a.device.make(*model, model->config().max_position_embeddings, a.max_batch_tokens);
  std::vector<nlohmann::ordered_json> runs;
  for (double rate : a.rates) runs.push_back(run_rate(a, *exec, rate));
  if (!a.plot.empty()) {
    const std::optional<std::string> png = draw_load_curve(runs, a.model);
    check(png.has_value(), "nibble bench", "--plot needs gnuplot (Debian's gnuplot-nox), which did not run");
    write_output_file(a.plot, *png, inputs);
  }
  if (a.json) {
    std::printf("%s\n", (runs.size() == 1 ? nlohmann::ordered_json(runs[0]) : nlohmann::ordered_json(runs)).dump(2).c_str());
  } else if (a.csv) {
    std::string head;
    for (const auto& [k, v] : runs[0].items()) head += (head.empty() ? "" : ",") + k;
    std::printf("%s\n", head.c_str());
    for (const auto& j : runs) {
      std::string row;
      for (const auto& [k, v] : j.items())
        row += (row.empty() ? "" : ",") + (v.is_string() ? v.get<std::string>() : v.dump());
      std::printf("%s\n", row.c_str());
    }
  } else {
    for (const auto& j : runs) {
      for (const auto& [k, v] : j.items())
        std::printf("%-22s %s\n", k.c_str(), v.is_string() ? v.get<std::string>().c_str() : v.dump().c_str());
      if (runs.size() > 1) std::printf("\n");
    }
  }
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
