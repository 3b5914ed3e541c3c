// nibble quantize -m DIR --recipe atom-w4a4 -f CALIB_TEXT -o FILE
#include <cstdio>

#include "nibble/core/progress.h"
#include "nibble/io/output_file.h"
#include "nibble/io/packed.h"
#include "nibble/io/text_file.h"
#include "nibble/quant/quantize_model.h"
#include "tools/commands.h"
#include "tools/recipe_options.h"

namespace nibble::cli {

namespace {
struct QuantizeArgs {
  std::string model, tokenizer, calib, out;
  RecipeOptions recipe;
  bool json = false;
};

void run_quantize(const QuantizeArgs& a) {
  namespace fs = std::filesystem;
  if (a.json) Progress::set_quiet(!isatty(2));
  const quant::Recipe recipe = a.recipe.build();
  const fs::path tokenizer = a.tokenizer.empty() ? fs::path(a.model) : fs::path(a.tokenizer);
  const fs::path inputs[] = {a.model, tokenizer, a.calib};
  check_output_path(a.out, inputs);  // before the work, not after
  std::vector<std::string> warnings;
  const fs::path tokenizer_json = fs::is_directory(tokenizer) ? tokenizer / "tokenizer.json" : tokenizer;
  if (!fs::is_regular_file(tokenizer_json)) {
    check(a.tokenizer.empty(), a.tokenizer, "no such tokenizer.json");
    warnings.push_back(fmt::format("{} not found: {} will carry no tokenizer (give --tokenizer PATH to embed one)",
                                   tokenizer_json.string(), a.out));
    std::fprintf(stderr, "warning: %s\n", warnings.back().c_str());
  }
  auto model = Model::load(a.model);
  check(model->metadata().count("nibble.recipe") == 0, a.model, "this is already a quantized nibble file");
  recipe.validate(model->config());
  std::vector<int32_t> calib;
  if (recipe.needs_calibration()) {
    check(!a.calib.empty(), "quantize", "recipe '{}' needs calibration text: give -f FILE (e.g. calib.txt)", recipe.name);
    const Tokenizer tok = load_tokenizer(a.model, a.tokenizer);
    calib = tok.encode(read_text_file(a.calib), tok.bos_id() >= 0);
  }
  std::fprintf(stderr, "quantizing %s with %s\n", a.model.c_str(), recipe.describe().c_str());
  const quant::QuantizeReport report = quant::quantize_model(*model, recipe, calib, a.calib);
  for (const auto& w : report.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  warnings.insert(warnings.end(), report.warnings.begin(), report.warnings.end());
  quant::Recipe used = recipe;  // the file records the window length the calibration really used
  if (report.calib_ctx > 0) used.calib_ctx = report.calib_ctx;
  const int64_t bytes = save_packed_model(*model, used.to_json().dump(), tokenizer, a.out);
  if (a.json) {
    nlohmann::json j = {{"out", a.out},         {"bytes", bytes},
                        {"weight_bytes", model->storage_bytes()}, {"recipe", used.to_json()},
                        {"seconds", report.seconds}, {"stats_seconds", report.stats_seconds},
                        {"quantize_seconds", report.quantize_seconds}, {"advance_seconds", report.advance_seconds},
                        {"peak_rss_bytes", report.peak_rss_bytes},
                        {"warnings", warnings}};
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("wrote %s: %.2f MB (weights %.2f MB), recipe %s\n", a.out.c_str(), double(bytes) / 1e6,
              double(model->storage_bytes()) / 1e6, recipe.describe().c_str());
  if (report.calib_windows > 0)
    std::printf("calibration: %lld windows of %lld tokens; ", (long long)report.calib_windows,
                (long long)report.calib_ctx);
  else
    std::printf("no calibration (the recipe takes no statistics); ");
  std::printf("%.1f s (statistics %.1f s, GPTQ/rounding %.1f s, quantized layers' passes %.1f s); peak RSS %.0f MB\n",
              report.seconds, report.stats_seconds, report.quantize_seconds, report.advance_seconds,
              double(report.peak_rss_bytes) / 1e6);
}
}  // namespace

void add_quantize_command(CLI::App& app) {
  auto a = std::make_shared<QuantizeArgs>();
  CLI::App* cmd = app.add_subcommand("quantize", "Quantize a Hugging Face checkpoint (Atom W4A4 by default) into a packed .safetensors file");
  cmd->add_option("-m,--model", a->model, "Hugging Face checkpoint directory")->required();
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_option("-f,--file", a->calib, "calibration text (e.g. calib.txt; never an evaluation text)");
  cmd->add_option("-o,--output", a->out,
                  "packed model file to write (a regular file, not one of the inputs; replaced only when complete)")
      ->required();
  cmd->add_flag("--json", a->json, "stdout is one JSON object (the summary), progress and warnings on stderr");
  a->recipe.add_to(cmd, true);
  cmd->callback([a] { run_quantize(*a); });
}

}  // namespace nibble::cli
