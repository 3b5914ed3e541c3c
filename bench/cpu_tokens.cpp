// CPU tokens/s of the fp32 forward pass: prefill of 512 tokens and decode at batch 1 and 8.
// Usage: bench_cpu_tokens [MODEL_DIR]   (default $NIBBLE_DATA/models/nibble-ref)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include <omp.h>

#include "nibble/core/progress.h"
#include "nibble/model/model.h"

using namespace nibble;

namespace {

// Runs `steps` decode steps for `batch` sequences after a `context`-token prefill; returns tokens/s.
double decode_tokens_per_second(Model& m, int batch, int context, int steps, std::mt19937& rng) {
  const int64_t V = m.config().vocab_size;
  std::vector<std::unique_ptr<KVCache>> caches;
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(batch), std::vector<int32_t>(static_cast<size_t>(context)));
  std::vector<Step> prefill;
  for (int b = 0; b < batch; ++b) {
    caches.push_back(m.new_cache(context + steps));
    for (auto& t : prompts[size_t(b)]) t = int32_t(rng() % V);
    prefill.push_back({caches.back().get(), prompts[size_t(b)], false});
  }
  m.forward(prefill);
  std::vector<int32_t> next(static_cast<size_t>(batch));
  for (auto& t : next) t = int32_t(rng() % V);
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    std::vector<Step> step;
    for (int b = 0; b < batch; ++b) step.push_back({caches[size_t(b)].get(), std::span(&next[size_t(b)], 1), false});
    m.forward(step);
  }
  return double(batch) * steps / seconds_since(t0);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc > 1 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
    std::printf("usage: bench_cpu_tokens [MODEL_DIR]   (default $NIBBLE_DATA/models/nibble-ref)\n"
                "prints tokens/s of prefill (512 tokens) and decode (batch 1 and 8) as a table\n");
    return 0;
  }
  std::filesystem::path dir;
  if (argc > 1) dir = argv[1];
  else dir = std::filesystem::path(std::getenv("NIBBLE_DATA") ? std::getenv("NIBBLE_DATA") : "../shared/data") /
             "models/nibble-ref";
  auto m = Model::load(dir);
  std::mt19937 rng(0);
  const int64_t V = m->config().vocab_size;

  std::vector<int32_t> prompt(512);
  for (auto& t : prompt) t = int32_t(rng() % V);
  double best_prefill = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto cache = m->new_cache(512);
    const Step s{cache.get(), prompt, false};
    const auto t0 = std::chrono::steady_clock::now();
    m->forward({&s, 1});
    best_prefill = std::max(best_prefill, 512 / seconds_since(t0));
  }
  const double d1 = decode_tokens_per_second(*m, 1, 128, 32, rng);
  const double d8 = decode_tokens_per_second(*m, 8, 128, 16, rng);

  std::printf("model: %s (%lld parameters), %d threads\n", dir.c_str(), (long long)m->parameter_count(),
              omp_get_max_threads());
  std::printf("| workload | tokens/s | ratio to decode batch 1 |\n|---|---|---|\n");
  std::printf("| prefill 512 tokens | %.1f | %.2f |\n", best_prefill, best_prefill / d1);
  std::printf("| decode batch 1 (context 128) | %.1f | 1.00 |\n", d1);
  std::printf("| decode batch 8 (context 128) | %.1f | %.2f |\n", d8, d8 / d1);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_cpu_tokens: error: %s\n", e.what());
  return 1;
}
