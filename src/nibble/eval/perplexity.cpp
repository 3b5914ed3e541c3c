#include "nibble/eval/perplexity.h"

#include <algorithm>
#include <cmath>

#include "nibble/core/error.h"
#include "nibble/core/progress.h"

namespace nibble {

int64_t default_perplexity_ctx(const ModelConfig& c) { return std::min<int64_t>(2048, c.max_position_embeddings); }

void log_softmax(const float* logits, int64_t n, double* out) {
  const double mx = *std::max_element(logits, logits + n);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[i] = double(logits[i]) - lse;
}

nlohmann::json PerplexityResult::to_json() const {
  nlohmann::json j = {{"ppl", ppl},         {"nll_mean", nll_mean}, {"tokens", tokens}, {"scored", scored},
                      {"windows", windows}, {"ctx", ctx},           {"seconds", seconds}};
  if (has_base) {
    j["base_ppl"] = base_ppl;
    j["kld_mean"] = kld_mean;
    j["kld_median"] = kld_median;
    j["kld_p99"] = kld_p99;
    j["kld_max"] = kld_max;
    j["top1"] = top1;
  }
  return j;
}

namespace {

std::vector<float> window_logits(Model& m, std::span<const int32_t> window) {
  auto cache = m.new_cache(int64_t(window.size()));
  const Step step{cache.get(), window, true};
  return m.forward({&step, 1});
}

}  // namespace

PerplexityResult perplexity(Model& model, std::span<const int32_t> tokens, const PerplexityOptions& opt,
                            Model* base) {
  const ModelConfig& c = model.config();
  PerplexityResult r;
  r.ctx = opt.ctx > 0 ? opt.ctx : default_perplexity_ctx(c);
  check(r.ctx >= 2, "perplexity", "--ctx must be at least 2, got {}", r.ctx);
  check(r.ctx <= c.max_position_embeddings, "perplexity", "--ctx {} is beyond the model's max_position_embeddings ({})",
        r.ctx, c.max_position_embeddings);
  if (base)
    check(base->config().vocab_size == c.vocab_size, "perplexity", "--kld-base has vocab {} but the model has {}",
          base->config().vocab_size, c.vocab_size);
  r.tokens = int64_t(tokens.size());
  r.windows = r.tokens / r.ctx;
  if (opt.max_windows > 0) r.windows = std::min(r.windows, opt.max_windows);
  check(r.windows > 0, "perplexity", "the text has {} tokens, fewer than one window of {}", r.tokens, r.ctx);
  r.has_base = base != nullptr;

  const int64_t V = c.vocab_size, preds = r.ctx - 1;
  double nll = 0, base_nll = 0;
  int64_t agree = 0;
  std::vector<double> klds;
  Progress progress("perplexity", r.windows * r.ctx, "tokens");
  for (int64_t w = 0; w < r.windows; ++w) {
    const auto window = tokens.subspan(size_t(w * r.ctx), size_t(r.ctx));
    const std::vector<float> logits = window_logits(model, window);
    std::vector<float> base_logits;
    if (base) base_logits = window_logits(*base, window);
    const size_t npred = static_cast<size_t>(preds);
    std::vector<double> nll_at(npred), base_nll_at(npred), kld_at(npred);
    std::vector<char> agree_at(npred);
#pragma omp parallel
    {
      std::vector<double> lp(static_cast<size_t>(V)), blp(static_cast<size_t>(V));
#pragma omp for
      for (int64_t i = 0; i < preds; ++i) {
        log_softmax(logits.data() + i * V, V, lp.data());
        const int32_t next = window[size_t(i + 1)];
        nll_at[size_t(i)] = -lp[size_t(next)];
        if (!base) continue;
        log_softmax(base_logits.data() + i * V, V, blp.data());
        base_nll_at[size_t(i)] = -blp[size_t(next)];
        double kl = 0;
        for (int64_t t = 0; t < V; ++t) kl += std::exp(blp[size_t(t)]) * (blp[size_t(t)] - lp[size_t(t)]);
        kld_at[size_t(i)] = std::max(0.0, kl);
        agree_at[size_t(i)] = std::max_element(lp.begin(), lp.end()) - lp.begin() ==
                              std::max_element(blp.begin(), blp.end()) - blp.begin();
      }
    }
    for (int64_t i = 0; i < preds; ++i) {
      nll += nll_at[size_t(i)];
      if (base) {
        base_nll += base_nll_at[size_t(i)];
        klds.push_back(kld_at[size_t(i)]);
        agree += agree_at[size_t(i)];
      }
    }
    r.scored += preds;
    progress.update((w + 1) * r.ctx, fmt::format("ppl {:.4f}", std::exp(nll / double(r.scored))));
  }
  r.nll_mean = nll / double(r.scored);
  r.ppl = std::exp(r.nll_mean);
  r.seconds = progress.elapsed_seconds();
  progress.finish(fmt::format("ppl {:.4f}", r.ppl));
  if (base) {
    r.base_ppl = std::exp(base_nll / double(r.scored));
    double sum = 0;
    for (double k : klds) sum += k;
    r.kld_mean = sum / double(klds.size());
    std::sort(klds.begin(), klds.end());
    auto quantile = [&](double q) { return klds[std::min(klds.size() - 1, size_t(q * double(klds.size() - 1) + 0.5))]; };
    r.kld_median = quantile(0.5);
    r.kld_p99 = quantile(0.99);
    r.kld_max = klds.back();
    r.top1 = double(agree) / double(r.scored);
  }
  return r;
}

}  // namespace nibble
