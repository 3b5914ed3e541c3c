#include "nibble/core/interrupt.h"

#include <csignal>

#include "nibble/core/error.h"

namespace nibble {

namespace {
volatile std::sig_atomic_t g_interrupted = 0;

void on_signal(int sig) {
  g_interrupted = 1;
  std::signal(sig, SIG_DFL);  // the second one ends the process
}
}  // namespace

void install_interrupt_handler() {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

void request_interrupt() { g_interrupted = 1; }

void throw_if_interrupted(const std::string& where) {
  if (g_interrupted) {
    g_interrupted = 0;
    throw Error(where, "interrupted (signal received)");
  }
}

}  // namespace nibble
