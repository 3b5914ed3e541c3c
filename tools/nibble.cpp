// nibble: 4-bit LLM quantization and inference. Subcommands follow llama.cpp's conventions
// (-m model, -f file, -p prompt, -n tokens). Errors print as one line and exit 1.
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>

#include <cblas.h>
#include <CLI/CLI.hpp>

#include "nibble/core/error.h"
#include "nibble/io/packed.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {

bool is_tokenizer_file(const std::string& path) {
  return !std::filesystem::is_regular_file(path) || std::filesystem::path(path).filename() == "tokenizer.json";
}

Tokenizer packed_tokenizer(const SafetensorsFile& file) {
  const std::optional<TokenizerFiles> files = packed_tokenizer_files(file);
  check(files.has_value(), file.path(),
        "the packed file holds no tokenizer (it was written without one): give --tokenizer PATH");
  return Tokenizer::from_files(*files, file.path());
}

// The default thread count: the CPUs this process may run on, less those other work keeps busy
// (the 1-minute load average), at least 1. OpenMP's own default (every CPU) makes each parallel
// region wait for threads the kernel has descheduled: on a busy 2-core machine generation from a
// packed stories260K ran 12 tok/s with 2 threads against 730 with 1.
int default_threads() {
  cpu_set_t set;
  const int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  double load = 0;
  if (getloadavg(&load, 1) != 1) load = 0;
  return std::clamp(cpus - int(load + 0.5), 1, cpus);
}

void set_threads(int n) {
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

}  // namespace

void add_tokenizer_option(CLI::App* cmd, std::string* path) {
  cmd->add_option("--tokenizer", *path,
                  "tokenizer.json, or a folder holding it (with tokenizer_config.json and config.json beside it "
                  "for BOS/EOS); default: the model's");
}

Tokenizer load_tokenizer(const std::string& model_path, const std::string& tokenizer_path) {
  check(std::filesystem::exists(model_path), model_path, "no such file or folder");
  if (!tokenizer_path.empty()) return Tokenizer::load(tokenizer_path);
  if (is_tokenizer_file(model_path)) return Tokenizer::load(model_path);
  return packed_tokenizer(*SafetensorsFile::open(model_path));
}

LoadedModel load_model_and_tokenizer(const std::string& model_path, const std::string& tokenizer_path) {
  if (!tokenizer_path.empty() || is_tokenizer_file(model_path)) {
    Tokenizer tok = load_tokenizer(model_path, tokenizer_path);  // cheap: fails before the model loads
    return {Model::load(model_path), std::move(tok)};
  }
  const auto file = SafetensorsFile::open(model_path);  // one opening for the model and its tokenizer
  std::unique_ptr<Model> model = load_packed_model(*file);
  return {std::move(model), packed_tokenizer(*file)};
}

void KVOverride::add_to(CLI::App* cmd) {
  cmd->add_option("--kv-bits", bits, "KV cache: 4 or 8 (integer, asymmetric per token and head), 16 (fp16), 32 (fp32)");
  cmd->add_option("--kv-clip", clip, "clip ratio of an integer KV cache");
  cmd->add_flag_callback("--k-after-rope", [this] { k_after_rope = true; }, "quantize K after RoPE");
  cmd->add_flag_callback("--k-before-rope", [this] { k_after_rope = false; }, "quantize K before RoPE (Atom)");
  cmd->add_flag_callback("--kv-hadamard", [this] { hadamard = true; }, "quantize K/V in a Hadamard-rotated basis");
  cmd->add_flag_callback("--no-kv-hadamard", [this] { hadamard = false; }, "no Hadamard rotation of K/V");
}

void KVOverride::apply(KVFormat& f) const {
  if (bits) f.bits = *bits;
  if (clip) f.clip = *clip;
  if (k_after_rope) f.k_before_rope = !*k_after_rope;
  if (hadamard) f.hadamard = *hadamard;
}

void check_cuda_when_named(const std::string& device) {
  std::string why;
  if (device == "cuda") check(cuda_device_available(&why), "--device cuda", "{}", why);
}

void DeviceOptions::add_to(CLI::App* cmd) {
  cmd->add_option("--device", device,
                  "cpu, cuda, or auto: cuda when a GPU is present and the model's formats have CUDA kernels, "
                  "else cpu (stderr says which ran and why)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->each(check_cuda_when_named);
  cmd->add_option("--gpu-mem-fraction", gpu_mem_fraction,
                  "cuda: share of the GPU memory free after loading that the KV cache may take")
      ->capture_default_str()
      ->check(CLI::Range(0.01, 1.0));
  cmd->add_option("--gpu-mem-gb", gpu_mem_gb,
                  "cuda: cap in GB on everything nibble allocates on the GPU (weights, buffers, KV cache); 0 = none")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--kv-pages", kv_pages,
                  "KV cache pages of 16 tokens, on either device (0: cuda from --gpu-mem-fraction, cpu unbounded)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--tp", tp,
                  "tensor parallelism: serve the model split across N GPUs of this host (cuda; --device cpu runs the N "
                  "ranks as threads, for testing); N must divide the attention heads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
}

std::unique_ptr<Executor> DeviceOptions::make(Model& model, int64_t max_context, int64_t max_batch_tokens) const {
  RuntimeOptions opt;
  opt.max_context = max_context;
  opt.max_batch_tokens = max_batch_tokens;
  opt.kv_pages = kv_pages;
  opt.gpu_mem_fraction = gpu_mem_fraction;
  opt.gpu_mem_gb = gpu_mem_gb;
  opt.tp = tp;
  // auto: the GPU when there is one and it takes the model (a format without a CUDA kernel is
  // refused by name), else the CPU, which runs every format; stderr says which, and why not the GPU.
  std::string why_not_gpu;
  if (device == "auto" && cuda_device_available(&why_not_gpu)) {
    opt.device = "cuda";
    try {
      auto e = make_executor(model, opt);
      std::fprintf(stderr, "device: %s\n", e->device_name().c_str());
      return e;
    } catch (const Error& err) {
      why_not_gpu = err.what();
    }
  }
  opt.device = device == "auto" ? "cpu" : device;
  auto e = make_executor(model, opt);
  if (device == "auto") why_not_gpu = " (" + why_not_gpu + ")";
  else why_not_gpu.clear();
  std::fprintf(stderr, "device: %s%s\n", e->device_name().c_str(), why_not_gpu.c_str());
  return e;
}

void KVOverride::apply(Model& m) const {
  KVFormat f = m.kv_format();
  apply(f);
  m.set_kv_format(f);
}

}  // namespace nibble::cli

int main(int argc, char** argv) {
  CLI::App app{"nibble: Atom-style W4A4 quantization and inference for Llama-family models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("nibble ") + NIBBLE_VERSION);
  nibble::cli::add_generate_command(app);
  nibble::cli::add_perplexity_command(app);
  nibble::cli::add_tokenize_command(app);
  nibble::cli::add_inspect_command(app);
  nibble::cli::add_quantize_command(app);
  nibble::cli::add_ablate_command(app);
  nibble::cli::add_split_command(app);
  nibble::cli::add_eval_command(app);
  nibble::cli::add_synth_command(app);
  nibble::cli::add_bench_command(app);
  nibble::cli::add_bench_serve_command(app);
  nibble::cli::add_serve_command(app);
  int threads = nibble::cli::default_threads();
  const std::string threads_help = fmt::format(
      "CPU threads (OpenMP and OpenBLAS); default: the CPUs this process may use less the 1-minute load average, "
      "at least 1 ({} now), since threads waiting for busy CPUs slow every step",
      threads);
  for (CLI::App* cmd : app.get_subcommands([](CLI::App*) { return true; })) {
    cmd->add_option("-t,--threads", threads, threads_help)->check(CLI::Range(1, 4096));
    cmd->parse_complete_callback([&threads] { nibble::cli::set_threads(threads); });
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    std::fprintf(stderr, "nibble: error: %s (--help lists the options)\n", what.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
