// What `nibble bench` (offline) and `nibble bench-serve` (over HTTP) print: one JSON object per
// arrival rate, shown as a table, CSV or JSON, and the load curve (output tokens/s against mean
// TPOT, Atom's figure 11 axes) as a PNG.
#pragma once

#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace nibble::cli {

// j[name_p50_ms], _p90_ms, _p99_ms and _mean_ms of `seconds`.
void add_latencies(nlohmann::ordered_json& j, const std::string& name, std::vector<double> seconds);

// The runs as `name value` lines (a blank line between runs), a CSV header and rows, or JSON (one
// object for one run, else an array).
void print_runs(const std::vector<nlohmann::ordered_json>& runs, bool json, bool csv);

// The runs' output_tokens_per_s against tpot_mean_ms, one point per run, titled `title`, written to
// `png` (checked with check_output_path against `inputs` first). Throws when gnuplot is missing.
void write_load_curve(const std::vector<nlohmann::ordered_json>& runs, const std::string& title,
                      const std::filesystem::path& png, std::span<const std::filesystem::path> inputs = {});

}  // namespace nibble::cli
