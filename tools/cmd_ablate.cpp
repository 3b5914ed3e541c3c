// nibble ablate -m DIR -f CALIB --eval TEXT[,TEXT]: Atom's ablation ladder as one table (perplexity
// on each text, KL-divergence and top-1 agreement against the full-precision model, size), plus
// nibble's own atom-w4a4; also written as CSV and a PNG bar chart.
#include <cstdio>
#include <optional>
#include <sstream>

#include "nibble/core/progress.h"
#include "nibble/eval/perplexity.h"
#include "nibble/eval/zero_shot.h"
#include "nibble/io/output_file.h"
#include "nibble/io/text_file.h"
#include "nibble/quant/ablation.h"
#include "nibble/quant/quantize_model.h"
#include "tools/plot.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {
struct AblateArgs {
  std::string model, tokenizer, calib, out = "ablation";
  std::vector<std::string> eval;
  int64_t ctx = 0, calib_ctx = 0;
  std::vector<int64_t> chunks;  // per --eval text (one value: all texts)
  int group = 128;
  int64_t keeper = 128;
  int64_t calib_windows = 128;
  uint64_t seed = 0;
  std::vector<std::string> tasks;  // zero-shot columns (nibble eval's tasks)
  int64_t task_limit = 0;
  bool atom_compat = false, json = false;
};

struct Row {
  std::string label;
  std::string recipe;
  int64_t bytes = 0;
  std::vector<PerplexityResult> results;  // one per eval text
  std::vector<double> task_values;        // Atom's metric per --tasks entry, then Atom's average
};

// The PNG bar chart: perplexity relative to FP per recipe, one bar colour per --eval text.
std::optional<std::string> draw_chart(const std::vector<Row>& rows, const std::vector<std::string>& eval) {
  std::string script =
      "set terminal pngcairo size 1100,520 noenhanced\n"
      "set style data histogram\nset style histogram cluster gap 1\nset style fill solid 0.8\n"
      "set ylabel 'perplexity relative to FP'\nset xtics rotate by -25\nset key top right autotitle columnheader\n"
      "set title 'nibble ablation (perplexity / FP perplexity)'\nset grid ytics\nplot ";
  for (size_t t = 0; t < eval.size(); ++t) script += std::string(t ? ", " : "") + "'-' using 2:xtic(1)";
  script += "\n";
  for (size_t t = 0; t < eval.size(); ++t) {
    script += "\"recipe\" " + gnuplot_data_string(std::filesystem::path(eval[t]).filename().string()) + "\n";
    for (const Row& r : rows)
      script += fmt::format("{} {:.5f}\n", gnuplot_data_string(r.label.substr(0, 28)),
                            r.results[t].ppl / rows[0].results[t].ppl);
    script += "e\n";
  }
  return run_gnuplot(script);
}

void run_ablate(const AblateArgs& a) {
  if (a.json) Progress::set_quiet(!isatty(2));
  std::vector<std::filesystem::path> inputs = {a.model, a.tokenizer, a.calib};
  inputs.insert(inputs.end(), a.eval.begin(), a.eval.end());
  const std::string csv_path = a.out + ".csv", png_path = a.out + ".png";
  for (const std::string& out : {csv_path, png_path}) check_output_path(out, inputs);  // before the work
  const Tokenizer tok = load_tokenizer(a.model, a.tokenizer);
  auto base = Model::load(a.model);
  const std::vector<int32_t> calib = tok.encode(read_text_file(a.calib), tok.bos_id() >= 0);
  std::vector<std::vector<int32_t>> texts;
  for (const auto& e : a.eval) texts.push_back(tok.encode(read_text_file(e), tok.bos_id() >= 0));
  const int64_t ctx = a.ctx > 0 ? a.ctx : base->config().default_window();
  const int64_t calib_ctx = a.calib_ctx > 0 ? a.calib_ctx : ctx;

  std::vector<quant::AblationStep> steps =
      quant::atom_ladder(a.group, a.keeper, a.atom_compat, a.calib_windows, calib_ctx, a.seed);
  quant::Recipe ours = quant::Recipe::preset("atom-w4a4");
  ours.weight.group = ours.act.group = a.group;
  ours.keeper = a.keeper;
  ours.calib_ctx = calib_ctx;
  ours.calib_windows = a.calib_windows;
  ours.seed = a.seed;
  ours.name = "nibble-atom-w4a4";
  steps.push_back({"nibble atom-w4a4 (default recipe)", ours});

  std::vector<Row> rows = {{"FP (bf16 weights, fp32 compute)", "fp16", base->storage_bytes(), {}, {}}};
  std::vector<std::unique_ptr<Model>> models;
  for (const auto& s : steps) {
    std::fprintf(stderr, "%s: %s\n", s.label.c_str(), s.recipe.describe().c_str());
    auto m = Model::load(a.model);
    for (const auto& w : quant::quantize_model(*m, s.recipe, calib, a.calib).warnings)
      std::fprintf(stderr, "warning: %s\n", w.c_str());
    rows.push_back({s.label, s.recipe.describe(), m->storage_bytes(), {}, {}});
    models.push_back(std::move(m));
  }
  std::vector<Model*> ptrs = {base.get()};
  for (auto& m : models) ptrs.push_back(m.get());
  check(a.chunks.size() <= 1 || a.chunks.size() == a.eval.size(), "--chunks",
        "give one value, or one per --eval text ({})", a.eval.size());
  PerplexityOptions opt;
  opt.ctx = ctx;
  for (size_t t = 0; t < texts.size(); ++t) {
    opt.max_windows = a.chunks.empty() ? 0 : a.chunks[a.chunks.size() == 1 ? 0 : t];
    std::fprintf(stderr, "evaluating %zu models on %s\n", ptrs.size(), a.eval[t].c_str());
    const auto results = perplexity_many(ptrs, texts[t], opt, base.get());
    for (size_t i = 0; i < rows.size(); ++i) rows[i].results.push_back(results[i]);
  }

  if (!a.tasks.empty()) {
    ZeroShotOptions zo;
    zo.tasks_dir = default_tasks_dir();
    zo.limit = a.task_limit;
    for (size_t i = 0; i < rows.size(); ++i) {
      std::fprintf(stderr, "zero-shot: %s\n", rows[i].label.c_str());
      const ZeroShotResults z = evaluate_tasks(*ptrs[i], tok, a.tasks, zo);
      for (const auto& t : z.tasks) rows[i].task_values.push_back(100 * t.atom_value());
      rows[i].task_values.push_back(100 * z.average);
    }
  }

  // The table: perplexity per text, KLD and top-1 on the first text, size (on stderr with --json,
  // whose stdout is one JSON object).
  FILE* human = a.json ? stderr : stdout;
  std::fprintf(human, "model: %s, calibration: %s (%lld windows of %lld tokens), eval windows of %lld tokens%s\n\n",
              a.model.c_str(), a.calib.c_str(), (long long)steps[0].recipe.calib_windows, (long long)calib_ctx, (long long)ctx,
              a.atom_compat ? ", ladder with --atom-compat" : "");
  for (size_t t = 0; t < a.eval.size(); ++t)
    std::fprintf(human, "%s: %lld windows of %lld tokens%s\n", a.eval[t].c_str(), (long long)rows[0].results[t].windows,
                (long long)ctx, rows[0].results[t].windows * ctx * 2 < rows[0].results[t].tokens ? " (a prefix: --chunks)" : "");
  std::fprintf(human, "\n| recipe |");
  for (const auto& e : a.eval) std::fprintf(human, " ppl %s |", std::filesystem::path(e).filename().c_str());
  std::fprintf(human, " KLD mean | KLD p99 | top-1 | bytes |");
  for (const auto& t : a.tasks) std::fprintf(human, " %s |", t.c_str());
  if (!a.tasks.empty()) std::fprintf(human, " zero-shot avg |");
  std::fprintf(human, "\n|---|");
  for (size_t t = 0; t < a.eval.size() + 4 + (a.tasks.empty() ? 0 : a.tasks.size() + 1); ++t) std::fprintf(human, "---|");
  std::fprintf(human, "\n");
  std::ostringstream csv;
  csv << "recipe,description";
  for (const auto& e : a.eval) csv << ",ppl " << std::filesystem::path(e).filename().string();
  csv << ",kld_mean,kld_p99,top1,bytes\n";
  nlohmann::json j_rows = nlohmann::json::array();
  for (const Row& r : rows) {
    std::fprintf(human, "| %s |", r.label.c_str());
    csv << '"' << r.label << "\",\"" << r.recipe << '"';
    nlohmann::json jr = {{"label", r.label}, {"recipe", r.recipe}, {"bytes", r.bytes}};
    for (size_t t = 0; t < r.results.size(); ++t) {
      std::fprintf(human, " %.3f |", r.results[t].ppl);
      csv << ',' << r.results[t].ppl;
      jr["ppl"][std::filesystem::path(a.eval[t]).filename().string()] = r.results[t].ppl;
    }
    const PerplexityResult& f = r.results[0];
    std::fprintf(human, " %.4f | %.4f | %.2f%% | %lld |", f.kld_mean, f.kld_p99, 100 * f.top1, (long long)r.bytes);
    for (double v : r.task_values) std::fprintf(human, " %.1f |", v);
    std::fprintf(human, "\n");
    jr["zero_shot"] = r.task_values;
    csv << ',' << f.kld_mean << ',' << f.kld_p99 << ',' << f.top1 << ',' << r.bytes << '\n';
    jr["kld_mean"] = f.kld_mean;
    jr["kld_p99"] = f.kld_p99;
    jr["top1"] = f.top1;
    j_rows.push_back(jr);
  }
  write_output_file(csv_path, csv.str(), inputs);
  std::fprintf(human, "\nwrote %s", csv_path.c_str());
  if (const std::optional<std::string> png = draw_chart(rows, a.eval)) {
    write_output_file(png_path, *png, inputs);
    std::fprintf(human, " and %s", png_path.c_str());
  } else {
    std::fprintf(stderr, "warning: no chart: gnuplot (with pngcairo) is not installed or failed\n");
  }
  std::fprintf(human, "\n");
  if (a.json) {
    const nlohmann::json j = {{"model", a.model}, {"calibration", a.calib}, {"eval", a.eval}, {"ctx", ctx},
                              {"calib_ctx", calib_ctx}, {"csv", csv_path}, {"rows", j_rows}};
    std::printf("%s\n", j.dump().c_str());
  }
}
}  // namespace

void add_ablate_command(CLI::App& app) {
  auto a = std::make_shared<AblateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "ablate", "Atom's ablation ladder (W4A4 RTN -> + keepers -> INT8 keepers -> + groups -> + clipping -> + GPTQ -> + "
                "KV4) and nibble's own recipe, scored on each --eval text against the FP model");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory")->required();
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_option("-f,--file", a->calib, "calibration text")->required()->check(CLI::ExistingFile);
  cmd->add_option("--eval", a->eval, "evaluation text(s), comma separated")->required()->delimiter(',')->check(CLI::ExistingFile);
  cmd->add_option("-c,--ctx", a->ctx, "window length for calibration and evaluation (default: min(2048, context))");
  cmd->add_option("--calib-ctx", a->calib_ctx,
                  "calibration window length when it differs from --ctx (Atom's code: 2048, even past the context)");
  cmd->add_option("--chunks", a->chunks, "evaluate only the first N windows (0 = all); one value, or one per --eval text")
      ->delimiter(',');
  cmd->add_option("--ladder-group", a->group, "group size of the ladder's grouped steps")->capture_default_str();
  cmd->add_option("--ladder-keeper", a->keeper, "keeper channels of the ladder")->capture_default_str();
  cmd->add_flag("--atom-compat", a->atom_compat, "run the ladder with Atom's released-code choices (and an FP16 row: fp16 activations)");
  cmd->add_option("-o,--output", a->out, "prefix of the CSV and PNG files")->capture_default_str();
  cmd->add_flag("--json", a->json, "stdout is one JSON object ({\"rows\": [...], ...}); the table and progress on stderr");
  cmd->add_option("--calib-windows,--nsamples", a->calib_windows, "calibration windows")->capture_default_str();
  cmd->add_option("--seed", a->seed, "calibration window seed")->capture_default_str();
  cmd->add_option("--tasks", a->tasks, "zero-shot columns, comma separated (nibble eval's tasks; Atom's metric each)")
      ->delimiter(',');
  cmd->add_option("--task-limit", a->task_limit, "zero-shot docs per task (lm-eval's --limit; 0 = all)");
  cmd->callback([a] { run_ablate(*a); });
}

}  // namespace nibble::cli
