#include "nibble/eval/perplexity.h"

#include <algorithm>
#include <cmath>

#include "nibble/core/dtype.h"
#include "nibble/core/error.h"
#include "nibble/core/progress.h"

namespace nibble {


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

// The logits of one window, scored from an empty cache (a fresh sequence, freed after). A NaN or
// inf among them (a damaged model, an overflow) is an error, as every score computed from it would
// be meaningless (std::max(0.0, NaN) even reads as 0).
std::vector<float> window_logits(Executor& m, std::span<const int32_t> window, int64_t w, int64_t chunk) {
  const SeqId seq = m.kv().add();
  std::vector<float> logits, piece;
  if (chunk <= 0) chunk = int64_t(window.size());
  try {
    for (size_t start = 0; start < window.size(); start += size_t(chunk)) {
      const BatchEntry entry{seq, window.subspan(start, std::min(size_t(chunk), window.size() - start)), true};
      m.forward({&entry, 1}, piece);
      logits.insert(logits.end(), piece.begin(), piece.end());
    }
  } catch (...) {
    m.kv().free(seq);
    throw;
  }
  m.kv().free(seq);
  const int64_t bad = find_non_finite(logits.data(), int64_t(logits.size()));
  if (bad >= 0) {
    const int64_t V = m.config().vocab_size;
    throw Error(m.device_name(), fmt::format("non-finite logit ({}) at window {}, position {}, token id {}: the "
                                             "model's output is not a number",
                                             logits[size_t(bad)], w, bad / V, bad % V));
  }
  return logits;
}

int64_t window_length(const PerplexityOptions& opt, const ModelConfig& c) {
  return opt.ctx > 0 ? opt.ctx : c.default_window();
}

}  // namespace

PerplexityResult perplexity(Executor& model, std::span<const int32_t> tokens, const PerplexityOptions& opt,
                            Executor* base) {
  Executor* const models[] = {&model};
  return perplexity_many(models, tokens, opt, base)[0];
}

PerplexityResult perplexity(Model& model, std::span<const int32_t> tokens, const PerplexityOptions& opt,
                            Model* base) {
  Model* const models[] = {&model};
  return perplexity_many(models, tokens, opt, base)[0];
}

std::vector<PerplexityResult> perplexity_many(std::span<Model* const> models, std::span<const int32_t> tokens,
                                              const PerplexityOptions& opt, Model* base) {
  check(!models.empty(), "perplexity", "no model to score");
  RuntimeOptions cpu;  // caches as long as one window, not the whole context
  cpu.max_context = window_length(opt, models[0]->config());
  std::vector<std::unique_ptr<Executor>> owned;
  std::vector<Executor*> executors;
  for (Model* m : models) executors.push_back(owned.emplace_back(make_executor(*m, cpu)).get());
  std::unique_ptr<Executor> base_executor = base ? make_executor(*base, cpu) : nullptr;
  return perplexity_many(executors, tokens, opt, base_executor.get());
}

std::vector<PerplexityResult> perplexity_many(std::span<Executor* const> models, std::span<const int32_t> tokens,
                                              const PerplexityOptions& opt, Executor* base) {
  check(!models.empty(), "perplexity", "no model to score");
  const ModelConfig& c = models[0]->config();
  PerplexityResult proto;
  proto.ctx = window_length(opt, c);
  check(proto.ctx >= 2, "perplexity", "--ctx must be at least 2, got {}", proto.ctx);
  for (Executor* m : models)
    check(proto.ctx <= m->config().max_position_embeddings && m->config().vocab_size == c.vocab_size, "perplexity",
          "--ctx {} is beyond max_position_embeddings ({}) or the models' vocabularies differ", proto.ctx,
          m->config().max_position_embeddings);
  if (base)
    check(base->config().vocab_size == c.vocab_size, "perplexity", "--kld-base has vocab {} but the model has {}",
          base->config().vocab_size, c.vocab_size);
  proto.tokens = int64_t(tokens.size());
  proto.windows = proto.tokens / proto.ctx;
  if (opt.max_windows > 0) proto.windows = std::min(proto.windows, opt.max_windows);
  check(proto.windows > 0, "perplexity", "the text has {} tokens, fewer than one window of {}", proto.tokens,
        proto.ctx);
  proto.has_base = base != nullptr;

  const int64_t V = c.vocab_size, preds = proto.ctx - 1;
  const size_t npred = static_cast<size_t>(preds), nmodels = models.size();
  std::vector<double> nll(nmodels, 0.0);
  std::vector<std::vector<double>> window_nll(nmodels);
  std::vector<int64_t> agree(nmodels, 0);
  std::vector<std::vector<double>> klds(nmodels);
  double base_nll = 0;
  Progress progress("perplexity", proto.windows * proto.ctx * int64_t(nmodels), "tokens");
  std::vector<double> base_lp;  // [preds, V] log-probs of the base on this window
  for (int64_t w = 0; w < proto.windows; ++w) {
    const auto window = tokens.subspan(size_t(w * proto.ctx), size_t(proto.ctx));
    if (base) {
      const std::vector<float> bl = window_logits(*base, window, w, opt.prefill_chunk);
      base_lp.resize(npred * size_t(V));
#pragma omp parallel for
      for (int64_t i = 0; i < preds; ++i) log_softmax(bl.data() + i * V, V, base_lp.data() + i * V);
      for (int64_t i = 0; i < preds; ++i) base_nll -= base_lp[size_t(i * V + window[size_t(i + 1)])];
    }
    for (size_t mi = 0; mi < nmodels; ++mi) {
      const std::vector<float> logits = window_logits(*models[mi], window, w, opt.prefill_chunk);
      std::vector<double> nll_at(npred), kld_at(npred);
      std::vector<char> agree_at(npred);
#pragma omp parallel
      {
        std::vector<double> lp(static_cast<size_t>(V));
#pragma omp for
        for (int64_t i = 0; i < preds; ++i) {
          log_softmax(logits.data() + i * V, V, lp.data());
          nll_at[size_t(i)] = -lp[size_t(window[size_t(i + 1)])];
          if (!base) continue;
          const double* blp = base_lp.data() + i * V;
          double kl = 0;
          for (int64_t t = 0; t < V; ++t) kl += std::exp(blp[t]) * (blp[t] - lp[size_t(t)]);
          kld_at[size_t(i)] = std::max(0.0, kl);
          agree_at[size_t(i)] = std::max_element(lp.begin(), lp.end()) - lp.begin() == std::max_element(blp, blp + V) - blp;
        }
      }
      double window_sum = 0;
      for (size_t i = 0; i < npred; ++i) {
        window_sum += nll_at[i];
        nll[mi] += nll_at[i];
        if (base) {
          klds[mi].push_back(kld_at[i]);
          agree[mi] += agree_at[i];
        }
      }
      window_nll[mi].push_back(window_sum / double(preds));
      const int64_t done = (w * int64_t(nmodels) + int64_t(mi) + 1) * proto.ctx;
      progress.update(done, fmt::format("ppl {:.4f}", std::exp(nll[0] / double((w + 1) * preds))));
    }
  }
  const double seconds = progress.elapsed_seconds();
  std::vector<PerplexityResult> out;
  for (size_t mi = 0; mi < nmodels; ++mi) {
    PerplexityResult r = proto;
    r.scored = proto.windows * preds;
    r.nll_mean = nll[mi] / double(r.scored);
    r.ppl = std::exp(r.nll_mean);
    r.seconds = seconds;
    r.window_nll = std::move(window_nll[mi]);
    if (base) {
      r.base_ppl = std::exp(base_nll / double(r.scored));
      auto& k = klds[mi];
      double sum = 0;
      for (double v : k) sum += v;
      r.kld_mean = sum / double(k.size());
      std::sort(k.begin(), k.end());
      auto quantile = [&](double q) { return k[std::min(k.size() - 1, size_t(q * double(k.size() - 1) + 0.5))]; };
      r.kld_median = quantile(0.5);
      r.kld_p99 = quantile(0.99);
      r.kld_max = k.back();
      r.top1 = double(agree[mi]) / double(r.scored);
    }
    check(std::isfinite(r.ppl) && (!base || (std::isfinite(r.base_ppl) && std::isfinite(r.kld_mean))),
          "perplexity", "perplexity {} (base {}, KLD {}) is not a finite number", r.ppl, r.base_ppl,
          r.kld_mean);
    out.push_back(r);
  }
  progress.finish(fmt::format("ppl {:.4f}", out[0].ppl));
  return out;
}

}  // namespace nibble
