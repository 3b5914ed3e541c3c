// nibble perplexity -m MODEL -f TEXT [--ctx N] [--kld-base MODEL] [--per-window] [--json]
#include <cstdio>

#include "nibble/core/progress.h"
#include "nibble/eval/perplexity.h"
#include "nibble/io/text_file.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct PerplexityArgs {
  std::string model, tokenizer, file, kld_base;
  PerplexityOptions opt;
  KVOverride kv;
  DeviceOptions device;
  std::string base_device;  // empty: --device
  bool json = false, per_window = false;
};

void run_perplexity(PerplexityArgs a) {
  if (a.json) Progress::set_quiet(!isatty(2));
  auto [model, tok] = load_model_and_tokenizer(a.model, a.tokenizer);
  warn_if_synthetic(a.model);
  a.kv.apply(*model);
  std::unique_ptr<Model> base;
  if (!a.kld_base.empty()) base = Model::load(a.kld_base);
  const std::string text = read_text_file(a.file);
  const std::vector<int32_t> tokens = tok.encode(text, tok.bos_id() >= 0);
  // Executors sized for one window at a time (the window is the whole step and the whole sequence).
  const int64_t window = a.opt.ctx > 0 ? a.opt.ctx : model->config().default_window();
  auto exec = a.device.make(*model, window, window);
  DeviceOptions base_device = a.device;
  if (!a.base_device.empty()) base_device.device = a.base_device;
  std::unique_ptr<Executor> base_exec = base ? base_device.make(*base, window, window) : nullptr;
  const PerplexityResult r = perplexity(*exec, tokens, a.opt, base_exec.get());
  if (a.json) {
    nlohmann::json j = r.to_json();
    j["model"] = a.model;
    j["device"] = exec->device_name();
    j["text"] = a.file;
    if (r.has_base) j["kld_base"] = a.kld_base;
    if (a.per_window) j["window_nll"] = r.window_nll;
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("model: %s (KV cache %s)\ntext: %s (%lld tokens with BOS)\n", a.model.c_str(), model->kv_format().describe().c_str(), a.file.c_str(),
              (long long)r.tokens);
  std::printf("windows: %lld of %lld tokens (remainder dropped), %lld predictions scored\n", (long long)r.windows,
              (long long)r.ctx, (long long)r.scored);
  std::printf("perplexity: %.4f (mean NLL %.6f nats/token), %.1f s, %.1f tokens/s\n", r.ppl, r.nll_mean, r.seconds,
              double(r.windows * r.ctx) / r.seconds);
  if (a.per_window) {
    // llama.cpp's style: [window]ppl, one per window.
    for (size_t w = 0; w < r.window_nll.size(); ++w) std::printf("[%zu]%.4f%s", w + 1, std::exp(r.window_nll[w]), w + 1 < r.window_nll.size() ? "," : "\n");
  }
  if (r.has_base)
    std::printf("vs %s (ppl %.4f): KLD mean %.6f, median %.6f, p99 %.6f, max %.4f; top-1 agreement %.2f%%\n",
                a.kld_base.c_str(), r.base_ppl, r.kld_mean, r.kld_median, r.kld_p99, r.kld_max, 100 * r.top1);
}
}  // namespace

void add_perplexity_command(CLI::App& app) {
  auto a = std::make_shared<PerplexityArgs>();
  CLI::App* cmd = app.add_subcommand(
      "perplexity",
      "Perplexity by the GPTQ/Atom protocol: the whole text tokenized once with one BOS at its start, cut into "
      "non-overlapping windows of --ctx tokens (remainder dropped), each window scored on its own, loss at "
      "positions 1..ctx-1 of every window, ppl = exp(mean NLL)");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory or packed nibble .safetensors")->required();
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_option("-f,--file", a->file, "UTF-8 text file (e.g. wikitext2_test_gptq_join.txt)")->required()->check(CLI::ExistingFile);
  cmd->add_option("-c,--ctx", a->opt.ctx, "window length in tokens; default min(2048, max_position_embeddings)");
  cmd->add_option("--chunks", a->opt.max_windows, "score only the first N windows (0 = all)")->capture_default_str();
  cmd->add_option("--kld-base", a->kld_base,
                  "a second (e.g. FP16) model run on the same windows: report KL-divergence(base||model) mean, "
                  "median, p99 and top-1 agreement");
  a->kv.add_to(cmd);
  a->device.add_to(cmd);
  cmd->add_option("--base-device", a->base_device,
                  "where --kld-base runs (default: --device): e.g. the GPU against the CPU reference")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd->add_flag("--per-window", a->per_window, "print each window's perplexity (and window_nll in --json)");
  cmd->add_flag("--json", a->json, "stdout is one JSON object (ppl, tokens, windows, ctx, kld_*), progress on stderr");
  cmd->callback([a] { run_perplexity(*a); });
}

}  // namespace nibble::cli
