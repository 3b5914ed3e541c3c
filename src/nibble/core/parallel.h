// parallel_for: an OpenMP loop whose body may throw. An exception must not leave an OpenMP
// region (the runtime calls std::terminate), so the first one is kept and rethrown on the
// calling thread after the region; the iterations not yet started are skipped.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>

namespace nibble {

enum class Schedule { Static, Dynamic };  // Dynamic: one iteration at a time (uneven work)

// Runs body(i) for i in [0, n); in parallel only when `parallel` (small loops stay on the caller).
template <typename Body>
void parallel_for(int64_t n, Body&& body, bool parallel = true, Schedule schedule = Schedule::Static) {
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
  auto run = [&](int64_t i) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      body(i);
    } catch (...) {
#pragma omp critical(nibble_parallel_for_failure)
      if (!failure) failure = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  };
  if (schedule == Schedule::Dynamic) {
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t i = 0; i < n; ++i) run(i);
  } else {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t i = 0; i < n; ++i) run(i);
  }
  if (failure) std::rethrow_exception(failure);
}

}  // namespace nibble
