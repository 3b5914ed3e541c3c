#include "nibble/quant/quantize_checkpoint.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "nibble/core/error.h"
#include "nibble/core/interrupt.h"
#include "nibble/core/json.h"
#include "nibble/core/progress.h"
#include "nibble/core/sha256.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/quant/device_math.h"
#include "nibble/quant/format.h"
#include "nibble/quant/quant_linear.h"
#include "nibble/quant/residual_rotation.h"

namespace nibble::quant {

namespace fs = std::filesystem;

namespace {

constexpr const char* kRunFile = "run.json";
constexpr const char* kOuterFile = "outer.safetensors";

fs::path layer_file(const fs::path& dir, int l) { return dir / fmt::format("layer-{:05d}.safetensors", l); }

// One linear's packed bytes (add_linear's tensors) from its shape and the recipe.
int64_t packed_linear_bytes(const Recipe& r, int64_t N, int64_t K, bool gathered, int src_bytes, LinearSlot slot) {
  if (!r.quantize_weights && !r.quantize_activations && !r.reorder) return N * K * src_bytes;
  const LinearQuantSpec s = r.linear_spec(K, "expected size", slot);
  int64_t bytes = r.reorder && gathered ? K * 4 : 0;
  if (!s.quantize_weights) return bytes + N * K * 4;
  auto matrix = [&](const FormatSpec& f, int64_t cols) {
    const int64_t groups = (N / f.row_group) * (f.group == 0 ? 1 : cols / f.group);
    int64_t b = N * cols * format_bits(f.format) / 8 + groups * scale_bytes(f.format);
    if (format_is_asymmetric(f.format)) b += groups;
    return b;
  };
  bytes += matrix(s.weight, K - s.keeper);
  if (s.keeper > 0) {
    const auto ks = keeper_spec(s.keeper_precision);
    bytes += ks ? matrix(*ks, s.keeper) : N * s.keeper * 2;
  }
  return bytes;
}

int64_t file_bytes_in(const fs::path& dir) {
  int64_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file(ec)) n += int64_t(e.file_size(ec));
  return n;
}

}  // namespace

void check_free_disk(const fs::path& out, const fs::path& work, int64_t expected) {
  const fs::path dir = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  struct statvfs st {};
  if (statvfs(dir.c_str(), &st) != 0) return;  // unknown: the writes will say so
  const double free_bytes = double(st.f_bavail) * double(st.f_frsize);
  const double needed = 2.0 * double(expected) - double(fs::exists(work) ? file_bytes_in(work) : 0);
  check(needed <= free_bytes, out.string(),
        "not enough disk space: the run needs about {:.2f} GB more in '{}' (the finished layers' files, {:.2f} GB, "
        "then the output beside them), {:.2f} GB are free",
        needed / 1e9, dir.string(), double(expected) / 1e9, free_bytes / 1e9);
}

namespace {

// Identifies a run: the source weights, the recipe as recorded and the calibration tokens.
std::string run_hash(const std::string& source_sha256, const Recipe& used, std::span<const int32_t> calib) {
  Sha256 sha;
  sha.update(source_sha256);
  sha.update(used.to_json().dump());
  sha.update({reinterpret_cast<const char*>(calib.data()), calib.size_bytes()});
  return sha.hex();
}

// Finished layers in `work` (0..n-1, each file written whole by write_output_file), after checking
// that the unfinished run there is this one.
int64_t finished_layers(const fs::path& work, const std::string& hash, int64_t num_layers) {
  const fs::path run = work / kRunFile;
  std::ifstream in(run);
  check(bool(in), run.string(), "cannot read the unfinished run's description: run without --resume to start over");
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json j = parse_json(text.str(), run.string());
  check(j.value("inputs_sha256", std::string()) == hash, work.string(),
        "the unfinished run there used another recipe, checkpoint or calibration text (inputs SHA-256 {}, this run "
        "{}): run without --resume to start over",
        j.value("inputs_sha256", std::string("?")), hash);
  int64_t n = 0;
  while (n < num_layers && fs::is_regular_file(layer_file(work, int(n)))) ++n;
  return n;
}

// What a failed run leaves: the work folder when it holds finished layers (said, for --resume),
// else nothing.
std::string unfinished(const fs::path& work) {
  if (fs::is_regular_file(layer_file(work, 0)))
    return fmt::format("; the finished layers stay in {}: run again with --resume to continue", work.string());
  std::error_code ec;
  fs::remove_all(work, ec);
  return "";
}

// Copies the tensors of the work folder's files into the output, one tensor in memory at a time
// (read with pread, not through the mapping, so the pages do not stay in this process's RSS).
void add_spilled(SafetensorsWriter& w, const fs::path& file) {
  auto f = SafetensorsFile::open(file);
  for (const auto& [tensor_name, t] : f->tensors()) {
    const std::string path = file.string(), name = tensor_name;  // clang 14 captures no structured binding
    const uint64_t offset = t.offset;
    w.add_generated(name, t.dtype, t.shape, [path, offset, name](std::span<uint8_t> out) {
      const int fd = ::open(path.c_str(), O_RDONLY);
      check(fd >= 0, path, "cannot open to copy tensor '{}': {}", name, std::strerror(errno));
      size_t done = 0;
      while (done < out.size()) {
        const ssize_t n = ::pread(fd, out.data() + done, out.size() - done, off_t(offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          ::close(fd);
          throw Error(path, fmt::format("tensor '{}': read failed at byte {}", name, offset + done));
        }
        done += size_t(n);
      }
      ::close(fd);
    });
  }
}

}  // namespace

fs::path partial_dir(const fs::path& out) {
  return out.parent_path() / fmt::format(".{}.partial", out.filename().string());
}

int64_t expected_packed_bytes(const Recipe& r, const ModelConfig& c, int src_bytes) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  int64_t layer = 2 * H * src_bytes +
                  packed_linear_bytes(r, c.q_dim() + 2 * c.kv_dim(), H, true, src_bytes, LinearSlot::QKV) +
                  packed_linear_bytes(r, H, c.q_dim(), true, src_bytes, LinearSlot::O);
  const int64_t experts = c.num_experts > 0 ? c.num_experts : 1;
  layer += experts * (packed_linear_bytes(r, 2 * I, H, true, src_bytes, LinearSlot::GateUp) +
                      packed_linear_bytes(r, H, I, false, src_bytes, LinearSlot::Down));
  if (c.num_experts > 0) layer += c.num_experts * H * src_bytes;
  return c.num_layers * layer + (V * H + H) * src_bytes + (c.tie_word_embeddings ? 0 : V * H * src_bytes);
}

CheckpointQuantizeResult quantize_checkpoint(const Recipe& recipe, std::span<const int32_t> calib_tokens,
                                             const CheckpointQuantizeOptions& opt) {
  CheckpointQuantizeResult res;
  const auto t_start = std::chrono::steady_clock::now();
  const Checkpoint ckpt = Checkpoint::open(opt.model);
  auto model = Model::open_layers(opt.model, ckpt);
  const ModelConfig& source_config = model->config();
  recipe.validate(source_config);
  // --residual-rotation: the layers are rotated as they are read, the outer tensors here; the file's
  // config is untied (the rotated LM head holds the final norm, the embedding does not).
  const bool rotate = recipe.residual_rotation != ResidualRotation::None;
  const std::vector<double> rotation =
      rotate ? residual_rotation_matrix(recipe.residual_rotation, source_config.hidden_size, recipe.seed)
             : std::vector<double>{};
  ModelConfig c = source_config;
  if (rotate) c.tie_word_embeddings = false;
  auto load_layer = [&](int l) {
    model->load_layer(ckpt, l);
    if (rotate) rotate_layer_residual(model->layers()[size_t(l)], rotation);
  };
  const fs::path inputs[] = {opt.model, opt.tokenizer};
  check_output_path(opt.out, inputs);
  res.recipe = recipe;  // the file records the window length the calibration really uses
  if (const int64_t ctx = LayerQuantizer::calib_window(recipe, c); ctx > 0) res.recipe.calib_ctx = ctx;
  const std::string embed_name = "model.embed_tokens.weight";
  const int src_bytes = int(dtype_size(ckpt.get(embed_name).dtype));
  const int64_t L = c.num_layers;
  const int64_t outer_values = c.vocab_size * c.hidden_size;

  const fs::path work = partial_dir(opt.out);
  res.work_dir = work;
  const std::string source_sha256 = checkpoint_sha256(ckpt);
  const std::string hash = run_hash(source_sha256, res.recipe, calib_tokens);
  std::error_code ec;
  check(!fs::exists(fs::symlink_status(work, ec)) || fs::is_directory(fs::symlink_status(work, ec)), work.string(),
        "exists and is not a folder: nibble keeps an unfinished run's layers there; move it away");
  if (opt.resume && fs::is_directory(work)) {
    res.layers_resumed = finished_layers(work, hash, L);
    std::fprintf(stderr, "resuming the unfinished run in %s: %lld of %lld layers already quantized (same recipe and "
                 "inputs, SHA-256 %.12s)\n", work.c_str(), (long long)res.layers_resumed, (long long)L, hash.c_str());
  } else {
    if (fs::is_directory(work))
      std::fprintf(stderr, "starting over: discarding the unfinished run in %s (--resume continues it)\n", work.c_str());
    else if (opt.resume)
      std::fprintf(stderr, "--resume: no unfinished run in %s; starting from layer 0\n", work.c_str());
    fs::remove_all(work);
  }
  check_free_disk(opt.out, work, expected_packed_bytes(res.recipe, c, src_bytes));
  if (res.layers_resumed == 0) {
    fs::create_directories(work);
    write_output_file(work / kRunFile, nlohmann::json{{"inputs_sha256", hash}, {"recipe", res.recipe.to_json()}}.dump());
  }

  QuantizeReport& report = res.report;
  try {
    // The tensors outside the layers, and the calibration windows' embeddings; the embedding is
    // held in fp32 only for this (less than a layer).
    std::vector<float> embedding = ckpt.load_f32(embed_name, {c.vocab_size, c.hidden_size});
    if (!fs::is_regular_file(work / kOuterFile)) {
      SafetensorsWriter w;
      std::unique_ptr<Linear> head;
      std::vector<float> final_norm = ckpt.load_f32("model.norm.weight", {c.hidden_size});
      if (!source_config.tie_word_embeddings || rotate) {
        std::vector<float> weights = source_config.tie_word_embeddings
                                         ? embedding
                                         : ckpt.load_f32("lm_head.weight", {c.vocab_size, c.hidden_size});
        if (rotate) {
          weights = rotate_lm_head(std::move(weights), final_norm, rotation);
          std::fill(final_norm.begin(), final_norm.end(), 1.0f);
        }
        head = std::make_unique<DenseLinear>(c.hidden_size, c.vocab_size, std::move(weights));
      }
      if (rotate) embedding = rotate_embedding(std::move(embedding), rotation);
      add_packed_outer(w, c, embedding, final_norm, head.get());
      w.write(work / kOuterFile);
    } else if (rotate) {
      embedding = rotate_embedding(std::move(embedding), rotation);
    }
    auto embedder = std::make_unique<Model>(c, opt.model.string(), std::move(embedding), std::vector<Layer>{},
                                            std::vector<float>{}, nullptr);
    embedder->set_fp16_activations(recipe.fp16_activations);
    // The rotated outer tensors are fp16 (2 bytes) whatever the checkpoint's dtype.
    res.weight_bytes = (outer_values + c.hidden_size) * 2 +
                       (c.tie_word_embeddings ? 0 : outer_values * (rotate ? 2 : src_bytes));
    LayerQuantizer q(*model, recipe, calib_tokens, opt.calib_where,
                     [&](std::span<const int32_t> w, float* h) { embedder->embed(w, h); }, report, opt.on_device);
    embedder.reset();
    const int64_t last = opt.stop_after_layers > 0 ? std::min(L, opt.stop_after_layers) : L;

    // Resumed layers: read back, and the calibration stream replayed through them.
    for (int l = 0; l < int(res.layers_resumed); ++l) {
      if (q.needs_full_precision_stream()) {
        load_layer(l);
        q.advance_full_precision(l);
      }
      model->layers()[size_t(l)] = load_packed_layer(*SafetensorsFile::open(layer_file(work, l)), c, res.recipe, l);
      res.weight_bytes += model->layer_storage_bytes(l);
      if (res.layers_resumed < last) q.advance(l);
      model->release_layer(l);
    }
    Progress progress("quantize", last - res.layers_resumed, "layers");
    auto peaks = [&] {
      std::string p = fmt::format("peak RSS {:.0f} MB", double(peak_rss_bytes()) / 1e6);
      if (opt.on_device) p += fmt::format(", device {:.0f} MB", double(device_memory_peak()) / 1e6);
      return p;
    };
    report.setup_seconds = seconds_since(t_start);
    for (int l = int(res.layers_resumed); l < int(last); ++l) {
      throw_if_interrupted(fmt::format("layer {}", l));
      auto t_io = std::chrono::steady_clock::now();
      load_layer(l);
      report.layer_io_seconds += seconds_since(t_io);
      q.quantize(l);
      t_io = std::chrono::steady_clock::now();
      SafetensorsWriter w;
      add_packed_layer(w, model->layers()[size_t(l)], l, c);
      w.write(layer_file(work, l));
      report.layer_io_seconds += seconds_since(t_io);
      res.weight_bytes += model->layer_storage_bytes(l);
      if (l + 1 < last) q.advance(l);
      model->release_layer(l);
      report.peak_rss_bytes = std::max(report.peak_rss_bytes, peak_rss_bytes());
      if (opt.on_device) report.peak_device_bytes = std::max(report.peak_device_bytes, device_memory_peak());
      if (opt.show_progress) progress.update(l + 1 - res.layers_resumed, fmt::format("layer {} done, {}", l, peaks()));
    }
    res.layers_done = last;
    if (opt.show_progress) progress.finish(peaks());
    // The output, unless stopped early on request (then the work folder is the result): every
    // tensor copied from the work folder, in the writer's (name) order.
    if (res.layers_done == L) {
      SafetensorsWriter w;
      add_spilled(w, work / kOuterFile);
      for (int l = 0; l < int(L); ++l) add_spilled(w, layer_file(work, l));
      add_packed_metadata(w, c, res.recipe.to_json().dump(), opt.model, source_sha256, opt.tokenizer);
      w.write(opt.out, inputs);
      fs::remove_all(work);
      res.bytes = int64_t(fs::file_size(opt.out));
    }
  } catch (const Error& e) {
    throw Error(e.where(), e.reason() + unfinished(work));
  } catch (const std::bad_alloc&) {
    throw Error(opt.out.string(), "out of memory" + unfinished(work));
  }
  report.seconds = seconds_since(t_start);
  report.peak_rss_bytes = std::max(report.peak_rss_bytes, peak_rss_bytes());
  return res;
}

}  // namespace nibble::quant
