// nibble generate -m MODEL -p PROMPT -n N: stream a continuation, greedy unless sampling is asked.
// An Engine with one request: the same code path as the server and `nibble bench`.
#include <chrono>
#include <cstdio>
#include <limits>

#include "nibble/engine/engine.h"
#include "nibble/model/model.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct GenerateArgs {
  std::string model, tokenizer, prompt;
  int n = 128;  // -1: until end of sequence or the context is full
  SamplingParams sampling;
  bool no_bos = false, ignore_eos = false;
  DeviceOptions device;
};

void run_generate(const GenerateArgs& a) {
  auto [model, tok] = load_model_and_tokenizer(a.model, a.tokenizer);
  std::vector<int32_t> ids = tok.encode(a.prompt, !a.no_bos && tok.bos_id() >= 0);
  check(!ids.empty(), "generate", "the prompt is empty and the tokenizer has no BOS token: give -p TEXT");
  const int64_t context = model->config().max_position_embeddings;
  check(int64_t(ids.size()) < context, "generate", "the prompt has {} tokens, at or past the model's context of {}",
        ids.size(), context);
  const int64_t capacity = a.n < 0 ? context : std::min<int64_t>(int64_t(ids.size()) + a.n, context);
  auto exec = a.device.make(*model, capacity, capacity);
  std::fputs(a.prompt.c_str(), stdout);  // the continuation's text keeps the space after it
  if (a.n != 0) {
    Engine engine(*exec, &tok, {.max_batch_tokens = capacity, .max_context = capacity, .prefix_caching = false});
    Request r{std::move(ids), a.sampling, {}};
    // Past the context generation stops where the context is full, as with -n -1.
    r.stop.max_tokens = a.n < 0 || int64_t(r.prompt.size()) + a.n - 1 > capacity ? -1 : a.n;
    r.stop.ignore_eos = a.ignore_eos;
    const size_t prompt_tokens = r.prompt.size();
    const auto t0 = std::chrono::steady_clock::now();
    double prefill_s = 0;
    int generated = 0;
    engine.submit(std::move(r), [&](const OutputEvent& ev) {
      if (generated == 0 && prefill_s == 0)
        prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (ev.finish != FinishReason::Stop) ++generated;  // an end-of-sequence token is not output
      std::fputs(ev.text.c_str(), stdout);
      std::fflush(stdout);
    });
    engine.run();
    const double decode_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() - prefill_s;
    std::fprintf(stderr, "prompt: %zu tokens in %.3f s (%.1f tok/s); generated: %d tokens (%.1f tok/s)\n", prompt_tokens,
                 prefill_s, double(prompt_tokens) / prefill_s, generated,
                 generated > 1 ? double(generated - 1) / decode_s : 0.0);
  }
  std::fputc('\n', stdout);
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
  a->device.add_to(cmd);
  add_sampling_options(cmd, &a->sampling);
  cmd->add_flag("--no-bos", a->no_bos, "do not prepend BOS to the prompt");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "keep generating past end-of-sequence tokens");
  cmd->callback([a] { run_generate(*a); });
}

void add_sampling_options(CLI::App* cmd, SamplingParams* s) {
  cmd->add_option("--temp", s->temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", s->top_k, "sample among the k most likely tokens; 0 = all")->capture_default_str();
  cmd->add_option("--top-p", s->top_p, "nucleus sampling mass; 1 = off")->capture_default_str();
  cmd->add_option("--min-p", s->min_p, "drop tokens less likely than min-p times the most likely; 0 = off")
      ->capture_default_str();
  cmd->add_option("--repeat-penalty", s->repetition_penalty, "penalty on tokens of the prompt and output; 1 = off")
      ->capture_default_str();
  cmd->add_option("--presence-penalty", s->presence_penalty, "subtracted from generated tokens' logits")
      ->capture_default_str();
  cmd->add_option("--frequency-penalty", s->frequency_penalty, "subtracted per time a token was generated")
      ->capture_default_str();
  cmd->add_option("--seed", s->seed, "random seed for sampling")->capture_default_str();
}

}  // namespace nibble::cli
