#include "tools/plot.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

namespace nibble::cli {

std::string gnuplot_data_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) out += (c == '"' || c == '\\' || uint8_t(c) < 0x20 || c == 0x7f) ? '?' : c;
  return out + "\"";
}

namespace {

// Writes all of `text` to a pipe; false when the reader is gone. The SIGPIPE that a gnuplot which
// exited early would raise is blocked and consumed, so it never kills nibble.
bool write_without_sigpipe(int fd, const std::string& text) {
  sigset_t pipe_signal, old_mask;
  sigemptyset(&pipe_signal);
  sigaddset(&pipe_signal, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_signal, &old_mask);
  const bool ok = write(fd, text.data(), text.size()) == ssize_t(text.size());
  if (!ok) {
    const timespec now{};
    while (sigtimedwait(&pipe_signal, nullptr, &now) == -1 && errno == EINTR) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  return ok;
}

}  // namespace

std::optional<std::string> run_gnuplot(const std::string& script) {
  int in[2], out[2];
  if (pipe2(in, O_CLOEXEC) != 0) return std::nullopt;
  if (pipe2(out, O_CLOEXEC) != 0) {
    close(in[0]);
    close(in[1]);
    return std::nullopt;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in[0], 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  char* argv[] = {const_cast<char*>("gnuplot"), nullptr};
  pid_t pid = -1;
  const int spawned = posix_spawnp(&pid, "gnuplot", &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  close(in[0]);
  close(out[1]);
  // The script is far below a pipe's buffer and gnuplot writes only once the plot is complete, so
  // writing it all before reading cannot deadlock.
  bool ok = spawned == 0 && write_without_sigpipe(in[1], script);
  close(in[1]);
  std::string image;
  char buf[65536];
  for (ssize_t n; spawned == 0 && (n = read(out[0], buf, sizeof buf)) != 0;) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ok = false;
      break;
    }
    image.append(buf, size_t(n));
  }
  close(out[0]);
  int status = 0;
  if (spawned == 0) waitpid(pid, &status, 0);
  if (!ok || !WIFEXITED(status) || WEXITSTATUS(status) != 0 || image.empty()) return std::nullopt;
  return image;
}

}  // namespace nibble::cli
