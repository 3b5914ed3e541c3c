// nibble quantize -m DIR --recipe atom-w4a4 -f CALIB_TEXT -o FILE [--resume] [--layers N]
#include <chrono>
#include <cstdio>

#include "nibble/core/progress.h"
#include "nibble/io/output_file.h"
#include "nibble/io/packed.h"
#include "nibble/io/text_file.h"
#include "nibble/backend/backend.h"
#include "nibble/core/interrupt.h"
#include "nibble/quant/quantize_checkpoint.h"
#include "tools/commands.h"
#include "tools/recipe_options.h"

namespace nibble::cli {

namespace {
struct QuantizeArgs {
  std::string model, tokenizer, calib, out;
  RecipeOptions recipe;
  bool json = false, resume = false;
  int64_t layers = 0;
  std::string device = "cpu";
};

void run_quantize(const QuantizeArgs& a) {
  namespace fs = std::filesystem;
  const quant::Recipe recipe = a.recipe.build();
  if (a.device == "cuda") {
    std::string why;
    check(cuda_device_available(&why), "--device cuda", "{}", why);
  }
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
  check(!fs::is_regular_file(a.model), a.model,
        "is a file: give a Hugging Face checkpoint directory (a packed file is already quantized)");
  std::vector<int32_t> calib;
  double tokenize_seconds = 0;
  if (recipe.needs_calibration()) {
    check(!a.calib.empty(), "quantize", "recipe '{}' needs calibration text: give -f FILE (e.g. calib.txt)", recipe.name);
    const auto t0 = std::chrono::steady_clock::now();
    const Tokenizer tok = load_tokenizer(a.model, a.tokenizer);
    calib = tok.encode(read_text_file(a.calib), tok.bos_id() >= 0);
    tokenize_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::fprintf(stderr, "quantizing %s with %s\n", a.model.c_str(), recipe.describe().c_str());
  install_interrupt_handler();  // Ctrl-C unwinds: the temporary files go, the finished layers stay
  quant::CheckpointQuantizeOptions opt;
  opt.model = a.model;
  opt.tokenizer = tokenizer;
  opt.out = a.out;
  opt.calib_where = a.calib;
  opt.resume = a.resume;
  opt.stop_after_layers = a.layers;
  opt.on_device = a.device == "cuda";
  const quant::CheckpointQuantizeResult res = quant::quantize_checkpoint(recipe, calib, opt);
  const quant::QuantizeReport& report = res.report;
  for (const auto& w : report.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  warnings.insert(warnings.end(), report.warnings.begin(), report.warnings.end());
  const bool complete = res.bytes > 0;
  if (a.json) {
    nlohmann::json j = {{"out", complete ? nlohmann::json(a.out) : nlohmann::json()},
                        {"bytes", res.bytes},
                        {"weight_bytes", res.weight_bytes},
                        {"recipe", res.recipe.to_json()},
                        {"layers_done", res.layers_done},
                        {"layers_resumed", res.layers_resumed},
                        {"seconds", report.seconds},
                        {"stats_seconds", report.stats_seconds},
                        {"quantize_seconds", report.quantize_seconds},
                        {"advance_seconds", report.advance_seconds},
                        {"tokenize_seconds", tokenize_seconds},
                        {"setup_seconds", report.setup_seconds},
                        {"layer_io_seconds", report.layer_io_seconds},
                        {"peak_rss_bytes", report.peak_rss_bytes},
                        {"peak_device_bytes", report.peak_device_bytes},
                        {"device_forward", report.device_forward},
                        {"kv_rotation_seconds", report.kv_rotation_seconds},
                        {"kv_rotation_losses", report.kv_rotation_losses},
                        {"warnings", warnings}};
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  if (complete)
    std::printf("wrote %s: %.2f MB (weights %.2f MB), recipe %s\n", a.out.c_str(), double(res.bytes) / 1e6,
                double(res.weight_bytes) / 1e6, recipe.describe().c_str());
  else
    std::printf("stopped after %lld layers as asked (--layers): they are in %s; no output written "
                "(run again with --resume to continue)\n",
                (long long)res.layers_done, res.work_dir.c_str());
  if (res.layers_resumed > 0) std::printf("resumed: %lld layers read back from the unfinished run\n", (long long)res.layers_resumed);
  if (report.calib_windows > 0)
    std::printf("calibration: %lld windows of %lld tokens; ", (long long)report.calib_windows,
                (long long)report.calib_ctx);
  else
    std::printf("no calibration (the recipe takes no statistics); ");
  std::printf("%.1f s (statistics %.1f s, GPTQ/rounding %.1f s, quantized layers' passes %.1f s; set-up %.1f s, "
              "reading and writing layers %.1f s; tokenizing before it %.1f s); peak RSS %.0f MB\n",
              report.seconds, report.stats_seconds, report.quantize_seconds, report.advance_seconds,
              report.setup_seconds, report.layer_io_seconds, tokenize_seconds, double(report.peak_rss_bytes) / 1e6);
  if (!report.kv_rotation_losses.empty()) {
    std::printf("KV rotations learned in %.1f s (part of the statistics):\n", report.kv_rotation_seconds);
    for (const std::string& line : report.kv_rotation_losses) std::printf("  %s\n", line.c_str());
  }
  if (opt.on_device)
    std::printf("device: calibration passes on the %s; peak device memory in use %.0f MB\n",
                report.device_forward ? "GPU" : "CPU (see the warning)", double(report.peak_device_bytes) / 1e6);
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
  cmd->add_option("--device", a->device,
                  "where the calibration passes, statistics and GPTQ run: cpu (the reference) or "
                  "cuda (the calibration stream resident on the GPU; passes without a kernel stay on the CPU, "
                  "with a warning)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->each(check_cuda_when_named);
  cmd->add_flag("--resume", a->resume,
                "continue an interrupted run of the same recipe and inputs from its last finished layer "
                "(kept in .OUTPUT.partial beside the output)");
  cmd->add_option("--layers", a->layers,
                  "stop after this many layers, keeping them for --resume and writing no output (measurements)")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--json", a->json, "stdout is one JSON object (the summary), progress and warnings on stderr");
  a->recipe.add_to(cmd, true);
  cmd->callback([a] { run_quantize(*a); });
}

}  // namespace nibble::cli
