#include "tools/bench_common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>

#include <fmt/format.h>

#include "nibble/core/error.h"
#include "nibble/io/output_file.h"
#include "tools/plot.h"

namespace nibble::cli {

void BenchLoadOptions::add_to(CLI::App* cmd) {
  cmd->add_option("--num-prompts", num_prompts, "requests per rate")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--prompt-len", prompt_len, "prompt tokens of each request (--dist fixed)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--output-len", output_len, "tokens each request generates (--dist fixed)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dist", dist, "fixed: --prompt-len/--output-len; atom: Atom's lognormal prompts, uniform totals")
      ->capture_default_str()
      ->check(CLI::IsMember({"fixed", "atom"}));
  cmd->add_option("--max-len", max_len, "--dist atom: longest prompt + output (bench: at most the model's context)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(3), int64_t(1) << 30));
  cmd->add_option("--rate,--rates", rates,
                  "Poisson arrivals, requests per second; 0 = all at once; a list (1,2,4) sweeps the load, one run each")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& v) {
            char* end = nullptr;
            const double rate = std::strtod(v.c_str(), &end);
            const bool ok = end != v.c_str() && *end == '\0' && std::isfinite(rate) && rate >= 0;
            return ok ? std::string() : "'" + v + "' is not a rate (requests per second, a number >= 0)";
          },
          "RATE"));
  cmd->add_option("--plot", plot, "write a PNG of output tokens/s against mean TPOT, one point per rate");
  cmd->add_option("--seed", seed, "seed of the lengths, prompts and arrivals (the same load for bench and bench-serve)")
      ->capture_default_str();
  cmd->add_flag("--json", json, "print JSON: one object per rate (an array for several); progress stays on stderr");
  cmd->add_flag("--csv", csv, "print a CSV header and a row per rate");
}

LoadSpec BenchLoadOptions::spec(double rate, int64_t vocab, int64_t context) const {
  return {.num_prompts = num_prompts,
          .dist = dist,
          .prompt_len = prompt_len,
          .output_len = output_len,
          .max_len = std::min(max_len, context),
          .vocab = vocab,
          .rate = rate,
          .seed = seed};
}

void add_latencies(nlohmann::ordered_json& j, const std::string& name, std::vector<double> seconds) {
  const LatencySummary s = summarize_latencies(std::move(seconds));
  j[name + "_p50_ms"] = s.p50_ms;
  j[name + "_p90_ms"] = s.p90_ms;
  j[name + "_p99_ms"] = s.p99_ms;
  j[name + "_mean_ms"] = s.mean_ms;
}

void print_runs(const std::vector<nlohmann::ordered_json>& runs, bool json, bool csv) {
  auto text = [](const nlohmann::ordered_json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); };
  if (json) {
    std::printf("%s\n", (runs.size() == 1 ? runs[0] : nlohmann::ordered_json(runs)).dump(2).c_str());
  } else if (csv) {
    std::string head;
    for (const auto& [k, v] : runs[0].items()) head += (head.empty() ? "" : ",") + k;
    std::printf("%s\n", head.c_str());
    for (const auto& j : runs) {
      std::string row;
      for (const auto& [k, v] : j.items()) {
        if (!row.empty()) row += ',';
        row += text(v);  // (a ternary prefix here trips gcc 12's -Wrestrict)
      }
      std::printf("%s\n", row.c_str());
    }
  } else {
    for (const auto& j : runs) {
      for (const auto& [k, v] : j.items()) std::printf("%-26s %s\n", k.c_str(), text(v).c_str());
      if (runs.size() > 1) std::printf("\n");
    }
  }
}

namespace {
constexpr const char* kNoGnuplot = "drawing the curve needs gnuplot (Debian's gnuplot-nox), which did not run";
}  // namespace

void check_load_curve_target(const std::filesystem::path& png, std::span<const std::filesystem::path> inputs) {
  check_output_path(png, inputs);
  check(run_gnuplot("set terminal pngcairo size 16,16\nplot 0\n").has_value(), "--plot", kNoGnuplot);
}

void write_load_curve(const std::vector<nlohmann::ordered_json>& runs, const std::string& title,
                      const std::filesystem::path& png, std::span<const std::filesystem::path> inputs) {
  std::string script = "set terminal pngcairo size 800,520 noenhanced\n"
                       "set xlabel 'mean TPOT (ms)'\nset ylabel 'output tokens/s'\nset grid\nset key off\n"
                       "set title " + gnuplot_data_string(title) + "\n"
                       "plot '-' using 1:2 with linespoints pointtype 7\n";
  for (const auto& j : runs)
    script += fmt::format("{:.4f} {:.2f}\n", j["tpot_mean_ms"].get<double>(), j["output_tokens_per_s"].get<double>());
  const std::optional<std::string> image = run_gnuplot(script + "e\n");
  check(image.has_value(), "--plot", kNoGnuplot);
  write_output_file(png, *image, inputs);
}

}  // namespace nibble::cli
