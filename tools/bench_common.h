// What `nibble bench` (offline) and `nibble bench-serve` (over HTTP) share: the options of the load
// (engine/bench_load.h) and the output, one JSON object per arrival rate shown as a table, CSV or
// JSON, and the load curve (output tokens/s against mean TPOT, Atom's figure 11 axes) as a PNG.
#pragma once

#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "nibble/engine/bench_load.h"

namespace nibble::cli {

struct BenchLoadOptions {
  int num_prompts = 100;
  int64_t prompt_len = 128, output_len = 128, max_len = 2048;
  std::string dist = "fixed";
  std::vector<double> rates = {0};  // requests per second, one run each; 0 = all at once
  std::string plot;                 // PNG of throughput against TPOT over the rates
  uint64_t seed = 0;
  bool json = false, csv = false;
  // --num-prompts, --prompt-len, --output-len, --dist, --max-len, --rate/--rates, --plot, --seed,
  // --json, --csv.
  void add_to(CLI::App* cmd);
  // The load at `rate` over `vocab` token ids, Atom's totals capped at `context` tokens.
  LoadSpec spec(double rate, int64_t vocab, int64_t context) const;
};

// j[name_p50_ms], _p90_ms, _p99_ms and _mean_ms of `seconds`.
void add_latencies(nlohmann::ordered_json& j, const std::string& name, std::vector<double> seconds);

// The runs as `name value` lines (a blank line between runs), a CSV header and rows, or JSON (one
// object for one run, else an array).
void print_runs(const std::vector<nlohmann::ordered_json>& runs, bool json, bool csv);

// Before the work, not after it: `png` can be written (check_output_path against `inputs`) and
// gnuplot runs; throws naming what is missing, so a long benchmark never ends without its results.
void check_load_curve_target(const std::filesystem::path& png, std::span<const std::filesystem::path> inputs = {});

// The runs' output_tokens_per_s against tpot_mean_ms, one point per run, titled `title`, written to
// `png` (checked with check_output_path against `inputs` first). Throws when gnuplot is missing.
void write_load_curve(const std::vector<nlohmann::ordered_json>& runs, const std::string& title,
                      const std::filesystem::path& png, std::span<const std::filesystem::path> inputs = {});

}  // namespace nibble::cli
