#include "nibble/core/progress.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>

#include <fmt/format.h>

namespace nibble {

namespace {
std::atomic<bool> g_quiet{false};

std::string format_duration(double s) {
  if (s < 0 || s > 1e7) return "?";
  const int t = int(s + 0.5);
  if (t >= 3600) return fmt::format("{}h{:02}m", t / 3600, (t / 60) % 60);
  if (t >= 60) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}
}  // namespace

Progress::Progress(std::string label, int64_t total, std::string unit)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), tty_(isatty(STDERR_FILENO)),
      start_(std::chrono::steady_clock::now()), last_print_(start_) {}

Progress::~Progress() {
  if (tty_ && !finished_ && done_ > 0 && !g_quiet) std::fputc('\n', stderr);
}

void Progress::set_quiet(bool quiet) { g_quiet = quiet; }

double Progress::elapsed_seconds() const {
  return seconds_since(start_);
}

void Progress::update(int64_t done, const std::string& extra) {
  done_ = done;
  const auto now = std::chrono::steady_clock::now();
  // A terminal gets a live line several times a second; a log gets a line every 10 seconds.
  const double every = tty_ ? 0.2 : 10.0;
  if (std::chrono::duration<double>(now - last_print_).count() < every) return;
  last_print_ = now;
  print(false, extra);
}

void Progress::finish(const std::string& extra) {
  if (finished_) return;
  finished_ = true;
  print(true, extra);
}

void Progress::print(bool final_line, const std::string& extra) {
  if (g_quiet) return;
  const double el = elapsed_seconds();
  const double rate = el > 0 ? double(done_) / el : 0.0;
  std::string line = fmt::format("{}: {}", label_, done_);
  if (total_ > 0) line += fmt::format("/{} {} ({:.0f}%)", total_, unit_, 100.0 * double(done_) / double(total_));
  else line += " " + unit_;
  line += fmt::format(", {:.1f} {}/s", rate, unit_);
  if (final_line) line += ", " + format_duration(el);
  else if (total_ > 0 && rate > 0) line += ", ETA " + format_duration(double(total_ - done_) / rate);
  if (!extra.empty()) line += ", " + extra;
  if (tty_) std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final_line ? "\n" : "");
  else std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace nibble
