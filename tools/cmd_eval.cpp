// nibble eval: zero-shot accuracy on the common-sense tasks Atom reports, scored by
// lm-evaluation-harness rules (src/nibble/eval/zero_shot.h), on an FP checkpoint or a packed file.
#include <cstdio>
#include <memory>
#include <sstream>

#include <fmt/format.h>

#include "nibble/core/error.h"
#include "nibble/core/progress.h"
#include "nibble/eval/zero_shot.h"
#include "nibble/io/output_file.h"
#include "nibble/model/model.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {

struct EvalArgs {
  std::string model, tokenizer, data, protocol = "lm-eval-0.4", output;
  std::string tasks = "piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande";
  int64_t limit = 0, ctx = 0, batch = 16;
  uint64_t seed = 42;
  bool json = false, csv = false, quiet = false;
  DeviceOptions device;
};

std::vector<std::string> split_tasks(const std::string& s) {
  std::vector<std::string> out;
  if (s == "all") {
    for (const TaskInfo& t : known_tasks()) out.push_back(t.name);
    return out;
  }
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  check(!out.empty(), "--tasks", "no task named");
  return out;
}

void run_eval(const EvalArgs& a) {
  if (a.quiet) Progress::set_quiet(true);
  const std::vector<std::string> tasks = split_tasks(a.tasks);
  for (const std::string& t : tasks) task_info(t);  // fail on a typo before loading the model

  ZeroShotOptions opt;
  opt.tasks_dir = a.data.empty() ? default_tasks_dir() : std::filesystem::path(a.data);
  check(std::filesystem::is_directory(opt.tasks_dir), opt.tasks_dir.string(),
        "task data folder not found (pass --data DIR or set NIBBLE_DATA)");
  opt.limit = a.limit;
  opt.seed = a.seed;
  opt.protocol = parse_protocol(a.protocol);
  opt.score.max_length = a.ctx;
  opt.score.batch_docs = a.batch;
  opt.show_progress = !a.quiet;

  if (!a.output.empty()) {
    const std::filesystem::path inputs[] = {a.model, a.tokenizer, opt.tasks_dir};
    check_output_path(a.output, inputs);
  }
  const auto [model, tokenizer] = load_model_and_tokenizer(a.model, a.tokenizer);
  warn_if_synthetic(a.model);
  // Sequences as long as the window; forward calls capped at what the executor's buffers take.
  const int64_t forward_tokens = opt.score.forward_tokens(model->config());
  opt.score.max_forward_tokens = forward_tokens;
  auto exec = a.device.make(*model, opt.score.window(model->config()), forward_tokens);
  ZeroShotResults r = evaluate_tasks(*exec, tokenizer, tasks, opt);
  r.model = model->source();
  for (const std::string& u : r.unavailable) std::fprintf(stderr, "nibble eval: skipped %s\n", u.c_str());
  check(!r.tasks.empty(), opt.tasks_dir.string(), "none of the tasks has data here");

  const std::string text = a.json ? r.to_json().dump(2) + "\n" : a.csv ? r.to_csv() : r.to_table();
  if (!a.output.empty()) {
    const std::filesystem::path inputs[] = {a.model, a.tokenizer, opt.tasks_dir};
    write_output_file(a.output, text, inputs);
  }
  std::fputs(text.c_str(), stdout);
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Zero-shot accuracy (PIQA, ARC-e/c, BoolQ, HellaSwag, WinoGrande, LAMBADA) by lm-eval-harness rules");
  cmd->add_option("-m,--model", a->model, "Model: an HF checkpoint directory or a packed nibble file")->required();
  cmd->add_option("--tasks", a->tasks,
                  "Comma-separated tasks (piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande, "
                  "lambada_openai) or 'all'; default: Atom's six")
      ->capture_default_str();
  cmd->add_option("--data", a->data,
                  "Task data folder (shared/data/tasks layout); default $NIBBLE_DATA/tasks, else the checkout's "
                  "../shared/data/tasks beside the nibble binary's source tree");
  cmd->add_option("--limit", a->limit,
                  "Score N docs per task, the ones lm-eval 0.3.0's --limit picks (its seed-42 shuffle, first N)");
  cmd->add_option("--seed", a->seed, "With --limit: the shuffle seed (Python random.Random(seed))")
      ->capture_default_str();
  cmd->add_option("--protocol", a->protocol,
                  "Tokenization: lm-eval-0.4 (joint encoding, BOS) or lm-eval-0.3 (Atom's: separate, no BOS)")
      ->capture_default_str();
  cmd->add_option("--ctx", a->ctx, "Model window for left truncation (default: max_position_embeddings)");
  cmd->add_option("--batch", a->batch, "Questions forwarded together")->capture_default_str();
  a->device.add_to(cmd);
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_flag("--json", a->json, "stdout is one lm-eval-style JSON object instead of the table (progress on stderr)");
  cmd->add_flag("--csv", a->csv, "Print CSV instead of the table");
  cmd->add_option("-o,--output", a->output, "Also write the output to this file");
  cmd->add_flag("-q,--quiet", a->quiet, "No progress on stderr");
  cmd->callback([a] {
    check(!(a->json && a->csv), "nibble eval", "--json and --csv are exclusive");
    run_eval(*a);
  });
}

}  // namespace nibble::cli
