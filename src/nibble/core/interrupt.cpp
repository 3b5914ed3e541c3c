#include "nibble/core/interrupt.h"

#include <atomic>
#include <csignal>

#include "nibble/core/error.h"

namespace nibble {

namespace {
// Lock-free, so safe in a signal handler; atomic, since OpenMP threads check it (GPTQ's linears).
std::atomic<bool> g_interrupted{false};
static_assert(std::atomic<bool>::is_always_lock_free);

void on_signal(int sig) {
  g_interrupted = true;
  std::signal(sig, SIG_DFL);  // the second one ends the process
}
}  // namespace

void install_interrupt_handler() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

void request_interrupt() { g_interrupted = true; }

void throw_if_interrupted(const std::string& where) {
  if (g_interrupted.exchange(false)) throw Error(where, "interrupted (signal received)");  // one thread throws
}

}  // namespace nibble
