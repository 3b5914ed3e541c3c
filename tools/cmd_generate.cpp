// nibble generate -m MODEL -p PROMPT -n N: stream a continuation, greedy unless sampling is asked.
#include <chrono>
#include <cstdio>
#include <limits>

#include "nibble/engine/sampler.h"
#include "nibble/model/model.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct GenerateArgs {
  std::string model, tokenizer, prompt;
  int n = 128;  // -1: until end of sequence or the context is full
  SamplerOptions sampling;
  bool no_bos = false, ignore_eos = false;
};

void run_generate(const GenerateArgs& a) {
  auto [model, tok] = load_model_and_tokenizer(a.model, a.tokenizer);
  std::vector<int32_t> ids = tok.encode(a.prompt, !a.no_bos && tok.bos_id() >= 0);
  check(!ids.empty(), "generate", "the prompt is empty and the tokenizer has no BOS token: give -p TEXT");
  const int64_t context = model->config().max_position_embeddings;
  check(int64_t(ids.size()) < context, "generate", "the prompt has {} tokens, at or past the model's context of {}",
        ids.size(), context);
  const int64_t capacity = a.n < 0 ? context : std::min<int64_t>(int64_t(ids.size()) + a.n, context);
  auto cache = model->new_cache(capacity);
  Sampler sampler(a.sampling);
  StreamDecoder out(tok, false, /*continues_text=*/true);  // the prompt is already printed
  std::fputs(a.prompt.c_str(), stdout);
  std::fflush(stdout);

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> feed = ids;
  int generated = 0;
  double prefill_s = 0;
  const auto& eos = tok.eos_ids();
  while ((a.n < 0 || generated < a.n) && cache->length() + int64_t(feed.size()) <= capacity) {
    const Step step{cache.get(), feed, false};
    const std::vector<float> logits = model->forward({&step, 1});
    if (generated == 0)
      prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int32_t next = sampler.sample(logits.data(), model->config().vocab_size);
    if (!a.ignore_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) break;
    std::fputs(out.push(next).c_str(), stdout);
    std::fflush(stdout);
    feed = {next};
    ++generated;
  }
  std::fputs(out.flush().c_str(), stdout);
  std::fputc('\n', stdout);
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double decode_s = total_s - prefill_s;
  if (prefill_s > 0)  // the model ran (not -n 0)
    std::fprintf(stderr, "prompt: %zu tokens in %.3f s (%.1f tok/s); generated: %d tokens (%.1f tok/s)\n", ids.size(),
               prefill_s, double(ids.size()) / prefill_s, generated,
               generated > 1 ? double(generated - 1) / decode_s : 0.0);
}
}  // namespace

void add_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from a prompt (greedy by default) and stream it");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory or packed nibble .safetensors")->required();
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_option("-p,--prompt", a->prompt, "prompt text (BOS is prepended when the tokenizer has one)");
  cmd->add_option("-n,--n-predict", a->n, "tokens to generate; -1 = until end of sequence or the context is full")
      ->capture_default_str()
      ->check(CLI::Range(-1, std::numeric_limits<int>::max()));
  cmd->add_option("--temp", a->sampling.temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "sample among the k most likely tokens; 0 = all")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "nucleus sampling mass; 1 = off")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "random seed for sampling")->capture_default_str();
  cmd->add_flag("--no-bos", a->no_bos, "do not prepend BOS to the prompt");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "keep generating past end-of-sequence tokens");
  cmd->callback([a] { run_generate(*a); });
}

}  // namespace nibble::cli
