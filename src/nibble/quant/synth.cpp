#include "nibble/quant/synth.h"

#include <cmath>
#include <fstream>
#include <numeric>
#include <span>
#include <sstream>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/core/progress.h"
#include "nibble/io/output_file.h"
#include "nibble/io/safetensors.h"

namespace nibble::quant {

namespace {

constexpr const char* kSyntheticKey = "nibble.synthetic";
constexpr const char* kPackedFormat = "nibble-packed-v1";  // io/packed.cpp's tag; test_synth checks they agree

ModelConfig llama(int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t kv_heads, int64_t vocab,
                  int64_t context) {
  ModelConfig c;
  c.arch = Arch::Llama;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = vocab;
  c.max_position_embeddings = context;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// Uniform in [lo, hi) from the top 24 bits.
float uniform(uint64_t bits, float lo, float hi) { return lo + (hi - lo) * (float(bits >> 40) * 0x1p-24f); }

// Standard deviation of a code drawn uniformly from a `bits`-bit two's complement grid.
double code_std(int bits) { return std::sqrt((std::ldexp(1.0, 2 * bits) - 1) / 12); }

// Random tensor contents. Each block of kBlock elements draws from its own stream, seeded by the
// seed, the tensor's name and the block's index: the bytes never depend on the thread count.
class Random {
 public:
  explicit Random(uint64_t seed) : seed_(seed) {}

  template <typename T, typename Draw>
  void fill(std::span<uint8_t> out, const std::string& name, const Draw& draw) const {
    constexpr int64_t kBlock = 1 << 16;
    T* data = reinterpret_cast<T*>(out.data());
    const int64_t n = int64_t(out.size() / sizeof(T)), blocks = (n + kBlock - 1) / kBlock;
    const uint64_t key = stream(name);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      uint64_t state = key ^ (uint64_t(b) * 0xd1b54a32d192ed03ull);
      const int64_t end = std::min(n, (b + 1) * kBlock);
      for (int64_t i = b * kBlock; i < end; ++i) data[i] = draw(state);
    }
  }

  void bytes(std::span<uint8_t> out, const std::string& name) const {
    if (out.size() % 8 == 0) fill<uint64_t>(out, name, [](uint64_t& s) { return splitmix64(s); });
    else fill<uint8_t>(out, name, [](uint64_t& s) { return uint8_t(splitmix64(s)); });
  }

  // Uniform values in [lo, hi) stored as `dtype` (F16, BF16 or F32).
  void floats(std::span<uint8_t> out, DType dtype, const std::string& name, float lo, float hi) const {
    auto value = [lo, hi](uint64_t& s) { return uniform(splitmix64(s), lo, hi); };
    if (dtype == DType::F16) fill<uint16_t>(out, name, [&](uint64_t& s) { return float_to_fp16(value(s)); });
    else if (dtype == DType::BF16) fill<uint16_t>(out, name, [&](uint64_t& s) { return float_to_bf16(value(s)); });
    else fill<float>(out, name, value);
  }

  // A uniformly random permutation of 0..n-1 (Fisher-Yates).
  void permutation(std::span<uint8_t> out, const std::string& name) const {
    std::span<int32_t> p(reinterpret_cast<int32_t*>(out.data()), out.size() / sizeof(int32_t));
    std::iota(p.begin(), p.end(), 0);
    uint64_t state = stream(name);
    for (size_t i = p.size(); i > 1; --i) std::swap(p[i - 1], p[splitmix64(state) % i]);
  }

 private:
  uint64_t stream(const std::string& name) const {
    uint64_t s = seed_ ^ fnv1a(name);
    return splitmix64(s);
  }

  uint64_t seed_;
};

std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  check(bool(in), p.string(), "cannot read the file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The tokenizer files `path` (a tokenizer.json or a folder holding one) names, as save_packed_model
// takes them: {file name, contents}; tokenizer_config.json when it lies beside.
std::vector<std::pair<std::string, std::string>> tokenizer_files(const std::filesystem::path& path) {
  if (path.empty()) return {};
  const auto json = std::filesystem::is_directory(path) ? path / "tokenizer.json" : path;
  check(std::filesystem::is_regular_file(json), json.string(), "tokenizer.json not found (--tokenizer)");
  std::vector<std::pair<std::string, std::string>> files = {{"tokenizer.json", read_file(json)}};
  if (const auto config = json.parent_path() / "tokenizer_config.json"; std::filesystem::is_regular_file(config))
    files.emplace_back("tokenizer_config.json", read_file(config));
  return files;
}

// Adds every tensor of the checkpoint to a writer as a generated one, in the layout `nibble quantize`
// (or a Hugging Face checkpoint) has, with values that keep a forward pass O(1): weights of a layer
// with K inputs have standard deviation 1/sqrt(K), norms lie near 1.
class SynthWriter {
 public:
  SynthWriter(const SynthOptions& opt, int64_t tensors)
      : opt_(opt), random_(opt.seed), progress_("synth", tensors, "tensors") {}

  SafetensorsWriter& writer() { return w_; }
  void finish() { progress_.finish(); }

  void floats(const std::string& name, std::vector<int64_t> shape, float lo, float hi) {
    add(name, opt_.dtype, std::move(shape), [=, this](std::span<uint8_t> out) {
      random_.floats(out, opt_.dtype, name, lo, hi);
    });
  }
  void norm(const std::string& name) { floats(name, {opt_.config.hidden_size}, 0.9f, 1.1f); }
  void weight(const std::string& name, int64_t N, int64_t K) {
    const float a = float(std::sqrt(3.0 / double(K)));  // uniform with standard deviation 1/sqrt(K)
    floats(name, {N, K}, -a, a);
  }

  // One quantized linear as io/packed.cpp stores it: perm (unless folded), codes, scales, keepers.
  void quantized(const std::string& name, int64_t N, int64_t K, bool perm, LinearSlot slot) {
    const LinearQuantSpec spec = opt_.recipe.linear_spec(K, name, slot);
    const int64_t M = K - spec.keeper;
    const double sd = 1 / std::sqrt(double(K));
    const std::string p = name + ".";
    if (perm)
      add(p + "perm", DType::I32, {K}, [=, this](std::span<uint8_t> out) { random_.permutation(out, p + "perm"); });
    const int bits = format_bits(spec.weight.format);
    const int64_t group = spec.weight.group == 0 ? M : spec.weight.group;
    codes(p + "codes", {N, bits == 4 ? M / 2 : M});
    scales(p + "scales", {N / spec.weight.row_group, M / group}, sd / code_std(bits));
    if (spec.keeper == 0) return;
    if (keeper_spec(spec.keeper_precision)) {  // INT8, one scale per row
      codes(p + "keeper_codes", {N, spec.keeper});
      scales(p + "keeper_scales", {N, 1}, sd / code_std(8));
    } else {
      const float a = float(sd * std::sqrt(3.0));
      add(p + "keeper_fp16", DType::F16, {N, spec.keeper},
          [=, this](std::span<uint8_t> out) { random_.floats(out, DType::F16, p + "keeper_fp16", -a, a); });
    }
  }

  void tokenizer_tensors() {
    for (const auto& [name, bytes] : tokenizer_files(opt_.tokenizer))
      w_.add(name, DType::U8, {int64_t(bytes.size())},
             std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }

 private:
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, SafetensorsWriter::Fill fill) {
    w_.add_generated(name, dtype, std::move(shape), [this, fill = std::move(fill)](std::span<uint8_t> out) {
      fill(out);
      progress_.update(++done_);
    });
  }
  void codes(const std::string& name, std::vector<int64_t> shape) {
    add(name, DType::U8, std::move(shape), [=, this](std::span<uint8_t> out) { random_.bytes(out, name); });
  }
  // fp16 scales within 20% of `typical`.
  void scales(const std::string& name, std::vector<int64_t> shape, double typical) {
    const float lo = float(0.8 * typical), hi = float(1.2 * typical);
    add(name, DType::F16, std::move(shape),
        [=, this](std::span<uint8_t> out) { random_.floats(out, DType::F16, name, lo, hi); });
  }

  const SynthOptions& opt_;
  SafetensorsWriter w_;
  Random random_;
  Progress progress_;
  int64_t done_ = 0;
};

std::string layer_prefix(int64_t l) { return fmt::format("model.layers.{}.", l); }

int64_t write_hf_directory(const SynthOptions& opt, const std::filesystem::path& out) {
  const ModelConfig& c = opt.config;
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  SynthWriter s(opt, 3 + c.num_layers * 9 - (c.tie_word_embeddings ? 1 : 0));
  s.floats("model.embed_tokens.weight", {c.vocab_size, H}, -1.7f, 1.7f);  // standard deviation ~1
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    s.norm(p + "input_layernorm.weight");
    s.norm(p + "post_attention_layernorm.weight");
    s.weight(p + "self_attn.q_proj.weight", c.q_dim(), H);
    s.weight(p + "self_attn.k_proj.weight", c.kv_dim(), H);
    s.weight(p + "self_attn.v_proj.weight", c.kv_dim(), H);
    s.weight(p + "self_attn.o_proj.weight", H, c.q_dim());
    s.weight(p + "mlp.gate_proj.weight", I, H);
    s.weight(p + "mlp.up_proj.weight", I, H);
    s.weight(p + "mlp.down_proj.weight", H, I);
  }
  s.norm("model.norm.weight");
  if (!c.tie_word_embeddings) s.weight("lm_head.weight", c.vocab_size, H);
  s.writer().set_metadata("format", "pt");
  s.writer().set_metadata(kSyntheticKey, "true");

  check(!std::filesystem::exists(out) || std::filesystem::is_directory(out), out.string(),
        "exists and is not a folder: the fp16 recipe writes a Hugging Face directory");
  std::filesystem::create_directories(out);
  nlohmann::json config = c.to_json();
  config["model_type"] = "llama";
  config["torch_dtype"] = opt.dtype == DType::BF16 ? "bfloat16" : opt.dtype == DType::F16 ? "float16" : "float32";
  config["nibble_synthetic"] = true;
  write_output_file(out / "config.json", config.dump(2) + "\n");
  for (const auto& [name, bytes] : tokenizer_files(opt.tokenizer)) write_output_file(out / name, bytes);
  s.writer().write(out / "model.safetensors");
  s.finish();
  int64_t bytes = 0;
  for (const auto& e : std::filesystem::directory_iterator(out))
    if (e.is_regular_file()) bytes += int64_t(e.file_size());
  return bytes;
}

int64_t write_packed_file(const SynthOptions& opt, const std::filesystem::path& out) {
  const ModelConfig& c = opt.config;
  const Recipe& r = opt.recipe;
  check(r.quantize_weights, "synth",
        "recipe '{}' leaves the weights at full precision: use --recipe fp16 (a Hugging Face directory) or a recipe "
        "that quantizes them",
        r.name);
  check(format_signed_codes(r.weight.format), "synth",
        "recipe '{}': synthetic weights are made for the INT4/INT8 recipes only, not {}", r.name,
        format_name(r.weight.format));
  check(r.keeper == 0 || r.keeper_precision == KeeperPrecision::Int8 || r.keeper_precision == KeeperPrecision::Fp16,
        "synth", "recipe '{}': synthetic keepers are INT8 or FP16, not {}", r.name,
        keeper_precision_name(r.keeper_precision));
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  // Tensor count for the progress line: per linear codes + scales (+ perm) (+ keeper tensors).
  const int64_t per_linear = 2 + (r.keeper > 0 ? (r.keeper_precision == KeeperPrecision::Int8 ? 2 : 1) : 0);
  const int64_t perms = r.reorder ? 3 : 0;  // q/k/v, o, gate/up gather; down_proj's order is folded
  SynthWriter s(opt, 2 + c.num_layers * (2 + 4 * per_linear + perms) + (c.tie_word_embeddings ? 0 : 1));
  s.floats("model.embed_tokens.weight", {c.vocab_size, H}, -1.7f, 1.7f);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    s.norm(p + "input_layernorm.weight");
    s.norm(p + "post_attention_layernorm.weight");
    s.quantized(p + "self_attn.qkv_proj", c.q_dim() + 2 * c.kv_dim(), H, r.reorder, LinearSlot::QKV);
    s.quantized(p + "self_attn.o_proj", H, c.q_dim(), r.reorder, LinearSlot::O);
    s.quantized(p + "mlp.gate_up_proj", 2 * I, H, r.reorder, LinearSlot::GateUp);
    s.quantized(p + "mlp.down_proj", H, I, false, LinearSlot::Down);
  }
  s.norm("model.norm.weight");
  if (!c.tie_word_embeddings) s.weight("lm_head.weight", c.vocab_size, H);
  s.tokenizer_tensors();
  Recipe used = r;  // as `nibble quantize` records it: the calibration window it would have used
  if (r.needs_calibration() && used.calib_ctx == 0) used.calib_ctx = c.default_window();
  s.writer().set_metadata("format", kPackedFormat);
  s.writer().set_metadata("nibble.version", NIBBLE_VERSION);
  s.writer().set_metadata("nibble.recipe", used.to_json().dump());
  s.writer().set_metadata("nibble.config", c.to_json().dump());
  s.writer().set_metadata("nibble.source", opt.source);
  s.writer().set_metadata("nibble.source_sha256", "none (synthetic)");
  s.writer().set_metadata(kSyntheticKey, "true");
  s.writer().write(out);
  s.finish();
  return int64_t(std::filesystem::file_size(out));
}

}  // namespace

std::vector<std::string> synthetic_shape_names() { return {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b"}; }

SyntheticShape synthetic_shape(const std::string& like) {
  if (like == "llama-2-7b") return {llama(4096, 11008, 32, 32, 32, 32000, 4096), DType::F16};
  if (like == "llama-2-13b") return {llama(5120, 13824, 40, 40, 40, 32000, 4096), DType::F16};
  if (like == "llama-2-70b") return {llama(8192, 28672, 80, 64, 8, 32000, 4096), DType::F16};
  if (like == "llama-3-8b") {
    ModelConfig c = llama(4096, 14336, 32, 32, 8, 128256, 131072);
    c.rope_theta = 500000;
    c.rope_scaling = {"llama3", 8.0, 1.0, 4.0, 8192};
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001};
    return {c, DType::BF16};
  }
  std::string names;
  for (const auto& n : synthetic_shape_names()) names += (names.empty() ? "" : ", ") + n;
  throw Error("--like", fmt::format("unknown model '{}' (choices: {})", like, names));
}

int64_t write_synthetic_model(const SynthOptions& opt, const std::filesystem::path& out) {
  const ModelConfig& c = opt.config;
  check(c.num_experts == 0 && !c.attention_bias, "synth",
        "synthetic models have the dense Llama layout (no experts, no q/k/v bias)");
  check(c.num_layers > 0, "synth", "the model needs at least one layer");
  check(opt.dtype == DType::F16 || opt.dtype == DType::BF16 || opt.dtype == DType::F32, "synth",
        "unquantized tensors are F16, BF16 or F32, not {}", dtype_name(opt.dtype));
  opt.recipe.validate(c);
  const Recipe& r = opt.recipe;
  if (!r.quantize_weights && !r.quantize_activations && !r.reorder) return write_hf_directory(opt, out);
  return write_packed_file(opt, out);
}

bool is_synthetic(const std::filesystem::path& path) {
  const Checkpoint ckpt = Checkpoint::open(path);
  for (const auto& f : ckpt.files())
    if (f->metadata().count(kSyntheticKey)) return true;
  return false;
}

}  // namespace nibble::quant
