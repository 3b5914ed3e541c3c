// Progress of a long job on stderr: a live line on a terminal, plain periodic lines otherwise.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace nibble {

// Wall-clock seconds since t0 on the monotonic clock (progress lines, phase timings, benches).
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class Progress {
 public:
  // `unit` names what is counted ("tokens", "layers"); total <= 0 means unknown.
  Progress(std::string label, int64_t total, std::string unit);
  ~Progress();

  // Reports `done` units so far; `extra` is appended (e.g. "ppl 12.3").
  void update(int64_t done, const std::string& extra = "");
  // Prints the final line (elapsed time and rate) once.
  void finish(const std::string& extra = "");

  double elapsed_seconds() const;
  static void set_quiet(bool quiet);  // --json runs and tests keep stderr clean

 private:
  void print(bool final_line, const std::string& extra);

  std::string label_, unit_;
  int64_t total_, done_ = 0;
  bool tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_print_;
};

}  // namespace nibble
