#include "nibble/io/packed.h"

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/core/json.h"
#include "nibble/core/sha256.h"
#include "nibble/io/safetensors.h"
#include "nibble/quant/quant_linear.h"
#include "nibble/quant/recipe.h"

namespace nibble {

namespace {

constexpr const char* kFormatTag = "nibble-packed-v1";

using quant::QuantizedMatrix;
using quant::QuantLinear;

// Names of a layer's linears in the packed file (q/k/v and gate/up are stored fused, as they run).
std::string qkv_name(int l) { return fmt::format("model.layers.{}.self_attn.qkv_proj", l); }
std::string o_name(int l) { return fmt::format("model.layers.{}.self_attn.o_proj", l); }
std::string k_rotation_name(int l) { return fmt::format("model.layers.{}.self_attn.k_rotation", l); }
std::string router_name(int l) { return fmt::format("model.layers.{}.block_sparse_moe.gate", l); }
std::string expert_prefix(int l, int e, bool moe) {
  return moe ? fmt::format("model.layers.{}.block_sparse_moe.experts.{}.", l, e) : fmt::format("model.layers.{}.mlp.", l);
}

template <typename T>
std::span<const uint8_t> bytes_of(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

// Stores full-precision values in the smallest dtype that holds every one of them exactly.
void add_exact_floats(SafetensorsWriter& w, const std::string& name, const std::vector<float>& v,
                      std::vector<int64_t> shape) {
  // In parallel: a 7B's embedding and LM head are 131 M values each.
  const int64_t n = int64_t(v.size());
  bool bf16 = true, fp16 = true;
#pragma omp parallel for reduction(&& : bf16, fp16) if (n >= (1 << 20))
  for (int64_t i = 0; i < n; ++i) {
    bf16 = bf16 && round_bf16(v[size_t(i)]) == v[size_t(i)];
    fp16 = fp16 && round_fp16(v[size_t(i)]) == v[size_t(i)];
  }
  if (bf16 || fp16) {
    std::vector<uint16_t> h(v.size());
#pragma omp parallel for if (n >= (1 << 20))
    for (int64_t i = 0; i < n; ++i) h[size_t(i)] = bf16 ? float_to_bf16(v[size_t(i)]) : float_to_fp16(v[size_t(i)]);
    w.add(name, bf16 ? DType::BF16 : DType::F16, std::move(shape), bytes_of(h));
  } else {
    w.add(name, DType::F32, std::move(shape), bytes_of(v));
  }
}

void add_matrix(SafetensorsWriter& w, const std::string& prefix, const QuantizedMatrix& q) {
  const quant::Format f = q.spec.format;
  if (quant::format_bits(f) == 4) {
    std::vector<uint8_t> packed(q.codes.size() / 2);
    quant::pack_4bit(f, q.codes.data(), int64_t(q.codes.size()), packed.data(), prefix);
    w.add(prefix + "codes", DType::U8, {q.rows, q.cols / 2}, bytes_of(packed));
  } else {
    w.add(prefix + "codes", DType::U8, {q.rows, q.cols}, bytes_of(q.codes));
  }
  if (!q.scales.empty()) {
    const int64_t srows = q.rows / q.spec.row_group, scols = int64_t(q.scales.size()) / srows;
    if (quant::scale_bytes(f) == 2) {
      std::vector<uint16_t> bits(q.scales.size());
      for (size_t i = 0; i < bits.size(); ++i) bits[i] = quant::scale_to_bits(f, q.scales[i]);
      w.add(prefix + "scales", DType::F16, {srows, scols}, bytes_of(bits));
    } else {
      std::vector<uint8_t> bits(q.scales.size());
      for (size_t i = 0; i < bits.size(); ++i) bits[i] = uint8_t(quant::scale_to_bits(f, q.scales[i]));
      w.add(prefix + "scales", DType::U8, {srows, scols}, bytes_of(bits));
    }
  }
  if (!q.zeros.empty()) w.add(prefix + "zeros", DType::U8, {int64_t(q.zeros.size())}, bytes_of(q.zeros));
  if (f == quant::Format::Nvfp4) w.add(prefix + "tensor_scale", DType::F32, {1}, bytes_of(std::vector<float>{q.tensor_scale}));
}

void add_linear(SafetensorsWriter& w, const std::string& name, const Linear& lin) {
  const int64_t N = lin.out_features(), K = lin.in_features();
  if (const auto* d = dynamic_cast<const DenseLinear*>(&lin)) {
    add_exact_floats(w, name + ".weight", d->weight(), {N, K});
    if (!d->bias().empty()) add_exact_floats(w, name + ".bias", d->bias(), {N});
    return;
  }
  const auto* q = dynamic_cast<const QuantLinear*>(&lin);
  check(q != nullptr, name, "cannot pack a linear layer of unknown kind");
  const std::string p = name + ".";
  if (!q->perm().empty()) w.add(p + "perm", DType::I32, {K}, bytes_of(q->perm()));
  if (!q->bias().empty()) add_exact_floats(w, p + "bias", q->bias(), {N});
  if (!q->spec().quantize_weights) {
    add_exact_floats(w, p + "weight", q->dequantized(), {N, K});
    return;
  }
  add_matrix(w, p, q->main());
  if (q->keepers()) add_matrix(w, p + "keeper_", *q->keepers());
  if (!q->keeper_fp16().empty()) w.add(p + "keeper_fp16", DType::F16, {N, q->spec().keeper}, bytes_of(q->keeper_fp16()));
}

std::string read_file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::string checkpoint_sha256(const Checkpoint& ckpt) {
  Sha256 sha;
  std::vector<char> buf(1 << 20);
  for (const auto& f : ckpt.files()) {
    std::ifstream in(f->path(), std::ios::binary);
    check(bool(in), f->path(), "cannot read the file to hash it");
    while (in.read(buf.data(), std::streamsize(buf.size())) || in.gcount() > 0)
      sha.update({buf.data(), size_t(in.gcount())});
    check(in.eof(), f->path(), "read failed while hashing");
  }
  return sha.hex();
}

namespace {

// Reads the packed tensors back, checking each against the shape the config and recipe imply.
class PackedReader {
 public:
  PackedReader(const SafetensorsFile& f, const quant::Recipe& r) : f_(f), recipe_(r) {}
  const quant::Recipe& recipe() const { return recipe_; }

  const TensorInfo& expect(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    check(f_.has(name), f_.path(), "tensor '{}' is missing (the file is incomplete or from another model)", name);
    const TensorInfo& t = f_.get(name);
    read_.insert(name);
    check(t.dtype == dtype, f_.path(), "tensor '{}' has dtype {}, expected {}", name, dtype_name(t.dtype),
          dtype_name(dtype));
    if (t.shape != shape) {
      TensorInfo e;
      e.shape = shape;
      throw Error(f_.path(), fmt::format("tensor '{}' has shape {} but the recipe and config imply {}", name,
                                         t.shape_str(), e.shape_str()));
    }
    return t;
  }

  std::vector<float> floats(const std::string& name, const std::vector<int64_t>& shape) const {
    check(f_.has(name), f_.path(), "tensor '{}' is missing (the file is incomplete or from another model)", name);
    const TensorInfo& t = f_.get(name);
    check(dtype_is_float(t.dtype), f_.path(), "tensor '{}' has dtype {}, expected a float type", name,
          dtype_name(t.dtype));
    return expect_floats(t, name, shape);
  }

  // `gathered`: the linear gathers its input channels at run time (all but down_proj, whose order is
  // folded into gate/up), so a reordering recipe stored its permutation.
  // `slot`: which keeper count of the recipe applies (none: lm_head).
  std::unique_ptr<Linear> linear(const std::string& name, int64_t N, int64_t K, bool gathered,
                                 std::optional<LinearSlot> slot) const {
    const std::string p = name + ".";
    if (f_.has(name + ".weight"))  // left at full precision (router, lm_head)
      return std::make_unique<DenseLinear>(K, N, floats(name + ".weight", {N, K}),
                                           f_.has(name + ".bias") ? floats(name + ".bias", {N}) : std::vector<float>{});
    const quant::LinearQuantSpec spec = recipe_.linear_spec(K, f_.path() + ": " + name, slot);
    std::vector<int32_t> perm;
    if (recipe_.reorder && gathered) {
      const TensorInfo& t = expect(p + "perm", DType::I32, {K});
      perm.assign(reinterpret_cast<const int32_t*>(t.data), reinterpret_cast<const int32_t*>(t.data) + K);
      std::vector<char> seen(size_t(K), 0);
      for (int32_t v : perm) {
        check(v >= 0 && v < K && !seen[size_t(v)], f_.path(), "tensor '{}perm' is not a permutation of 0..{}", p, K - 1);
        seen[size_t(v)] = 1;
      }
    }
    std::vector<float> bias;
    if (f_.has(p + "bias")) bias = floats(p + "bias", {N});
    if (!spec.quantize_weights)
      return QuantLinear::activation_only(spec, N, K, std::move(perm), floats(p + "weight", {N, K}), std::move(bias));
    QuantizedMatrix main = matrix(p, spec.weight, N, K - spec.keeper);
    std::optional<QuantizedMatrix> keepers;
    std::vector<uint16_t> keeper_fp16;
    if (spec.keeper > 0) {
      if (const auto ks = quant::keeper_spec(spec.keeper_precision)) {
        keepers = matrix(p + "keeper_", *ks, N, spec.keeper);
      } else {
        const TensorInfo& t = expect(p + "keeper_fp16", DType::F16, {N, spec.keeper});
        keeper_fp16.resize(size_t(N * spec.keeper));
        std::memcpy(keeper_fp16.data(), t.data, t.nbytes);
      }
    }
    // Finite scales can still decode to inf (an E8M0 scale of 2^127 times a code of 6).
    check_dequantizes_finite(main, name + ".codes");
    if (keepers) check_dequantizes_finite(*keepers, name + ".keeper_codes");
    return std::make_unique<QuantLinear>(spec, std::move(perm), std::move(main), std::move(keepers),
                                         std::move(keeper_fp16), std::move(bias));
  }

  // Every tensor of the file must have been read; the tokenizer's are read by packed_tokenizer_files.
  void check_all_read() const {
    std::set<std::string> read = read_;
    read.insert({"tokenizer.json", "tokenizer_config.json"});
    std::vector<std::string> all;
    for (const auto& [name, t] : f_.tensors()) all.push_back(name);
    nibble::check_all_read(all, read, f_.path());
  }

 private:
  void check_dequantizes_finite(const QuantizedMatrix& q, const std::string& tensor) const {
    const int64_t i = quant::first_non_finite_dequantized(q);
    check(i < 0, f_.path(), "tensor '{}' dequantizes to a non-finite value at element {} (of {}) with its scales: "
          "the file is damaged", tensor, i, q.rows * q.cols);
  }

  std::vector<float> expect_floats(const TensorInfo& t, const std::string& name, const std::vector<int64_t>& shape) const {
    expect(name, t.dtype, shape);
    return finite_f32(t, f_.path());
  }

  QuantizedMatrix matrix(const std::string& p, const quant::FormatSpec& spec, int64_t rows, int64_t cols) const {
    QuantizedMatrix q;
    q.spec = spec;
    q.rows = rows;
    q.cols = cols;
    const bool four = quant::format_bits(spec.format) == 4;
    const TensorInfo& c = expect(p + "codes", DType::U8, {rows, four ? cols / 2 : cols});
    q.codes.resize(size_t(rows * cols));
    if (four) quant::unpack_4bit(spec.format, c.data, rows * cols, q.codes.data(), f_.path() + ": " + p + "codes");
    else std::memcpy(q.codes.data(), c.data, c.nbytes);
    if (quant::scale_bytes(spec.format) > 0) {
      const int64_t srows = rows / spec.row_group, scols = cols / q.group_size();
      const int sb = quant::scale_bytes(spec.format);
      const TensorInfo& s = expect(p + "scales", sb == 2 ? DType::F16 : DType::U8, {srows, scols});
      q.scales.resize(size_t(srows * scols));
      for (size_t i = 0; i < q.scales.size(); ++i) {
        const uint16_t bits = sb == 2 ? reinterpret_cast<const uint16_t*>(s.data)[i] : s.data[i];
        q.scales[i] = quant::scale_from_bits(spec.format, bits);
      }
      check_finite_tensor(q.scales.data(), int64_t(q.scales.size()), f_.path(), p + "scales");
      if (quant::format_is_asymmetric(spec.format)) {
        const TensorInfo& z = expect(p + "zeros", DType::U8, {srows * scols});
        q.zeros.assign(z.data, z.data + z.nbytes);
      }
    }
    if (spec.format == quant::Format::Nvfp4)
      q.tensor_scale = *reinterpret_cast<const float*>(expect(p + "tensor_scale", DType::F32, {1}).data);
    return q;
  }

  const SafetensorsFile& f_;
  const quant::Recipe& recipe_;
  mutable std::set<std::string> read_;
};

Layer read_layer(const PackedReader& r, const ModelConfig& c, int l) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  Layer layer;
  layer.attn_norm = r.floats(fmt::format("model.layers.{}.input_layernorm.weight", l), {H});
  layer.mlp_norm = r.floats(fmt::format("model.layers.{}.post_attention_layernorm.weight", l), {H});
  layer.qkv = r.linear(qkv_name(l), c.q_dim() + 2 * c.kv_dim(), H, true, LinearSlot::QKV);
  layer.o = r.linear(o_name(l), H, c.q_dim(), true, LinearSlot::O);
  if (r.recipe().learns_k_rotation())
    layer.k_rotation = r.floats(k_rotation_name(l), {c.num_kv_heads, c.head_dim, c.head_dim});
  const bool moe = c.num_experts > 0;
  if (moe) layer.router = r.linear(router_name(l), c.num_experts, H, false, LinearSlot::Router);
  for (int64_t e = 0; e < (moe ? c.num_experts : 1); ++e) {
    const std::string p = expert_prefix(l, int(e), moe);
    layer.experts.push_back({r.linear(p + "gate_up_proj", 2 * I, H, true, LinearSlot::GateUp),
                             r.linear(p + "down_proj", H, I, false, LinearSlot::Down)});
  }
  return layer;
}

}  // namespace

Layer load_packed_layer(const SafetensorsFile& file, const ModelConfig& c, const quant::Recipe& recipe, int l) {
  PackedReader r(file, recipe);
  Layer layer = read_layer(r, c, l);
  r.check_all_read();
  return layer;
}

void add_packed_layer(SafetensorsWriter& w, const Layer& layer, int l, const ModelConfig& c) {
  const int64_t hidden = c.hidden_size;
  add_exact_floats(w, fmt::format("model.layers.{}.input_layernorm.weight", l), layer.attn_norm, {hidden});
  add_exact_floats(w, fmt::format("model.layers.{}.post_attention_layernorm.weight", l), layer.mlp_norm, {hidden});
  if (!layer.k_rotation.empty())  // fp32: the rotation's orthogonality is what keeps q·k
    w.add(k_rotation_name(l), DType::F32, {c.num_kv_heads, c.head_dim, c.head_dim}, bytes_of(layer.k_rotation));
  add_linear(w, qkv_name(l), *layer.qkv);
  add_linear(w, o_name(l), *layer.o);
  if (layer.router) add_linear(w, router_name(l), *layer.router);
  for (size_t e = 0; e < layer.experts.size(); ++e) {
    const std::string p = expert_prefix(l, int(e), bool(layer.router));
    add_linear(w, p + "gate_up_proj", *layer.experts[e].gate_up);
    add_linear(w, p + "down_proj", *layer.experts[e].down);
  }
}

void add_packed_outer(SafetensorsWriter& w, const ModelConfig& c, const std::vector<float>& embedding,
                      const std::vector<float>& final_norm, const Linear* lm_head) {
  add_exact_floats(w, "model.embed_tokens.weight", embedding, {c.vocab_size, c.hidden_size});
  add_exact_floats(w, "model.norm.weight", final_norm, {c.hidden_size});
  if (!c.tie_word_embeddings) add_linear(w, "lm_head", *lm_head);
}

void add_packed_metadata(SafetensorsWriter& w, const ModelConfig& c, const std::string& recipe_json,
                         const std::filesystem::path& source, const std::string& source_sha256,
                         const std::filesystem::path& tokenizer) {
  const std::filesystem::path tokenizer_json =
      std::filesystem::is_directory(tokenizer) ? tokenizer / "tokenizer.json" : tokenizer;
  for (const auto& [name, p] : {std::pair{"tokenizer.json", tokenizer_json},
                                std::pair{"tokenizer_config.json", tokenizer_json.parent_path() / "tokenizer_config.json"}}) {
    if (!std::filesystem::is_regular_file(p)) continue;
    const std::string bytes = read_file_bytes(p);
    w.add(name, DType::U8, {int64_t(bytes.size())},
          std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }
  w.set_metadata("format", kFormatTag);
  w.set_metadata("nibble.version", NIBBLE_VERSION);
  w.set_metadata("nibble.recipe", recipe_json);
  w.set_metadata("nibble.config", c.to_json().dump());
  w.set_metadata("nibble.source", std::filesystem::absolute(source).lexically_normal().filename().string());
  w.set_metadata("nibble.source_sha256", source_sha256);
}

int64_t save_packed_model(const Model& model, const std::string& recipe_json,
                          const std::filesystem::path& tokenizer, const std::filesystem::path& out) {
  const ModelConfig& c = model.config();
  SafetensorsWriter w;
  for (int l = 0; l < int(c.num_layers); ++l) add_packed_layer(w, model.layers()[size_t(l)], l, c);
  add_packed_outer(w, c, model.embedding(), model.final_norm(), &model.lm_head());
  const std::filesystem::path source(model.source());
  add_packed_metadata(w, c, recipe_json, source, checkpoint_sha256(Checkpoint::open(source)), tokenizer);
  const std::filesystem::path inputs[] = {source, tokenizer};
  w.write(out, inputs);
  return int64_t(std::filesystem::file_size(out));
}

std::unique_ptr<Model> load_packed_model(const std::filesystem::path& path) {
  return load_packed_model(*SafetensorsFile::open(path));
}

std::unique_ptr<Model> load_packed_model(const SafetensorsFile& file) {
  const std::string& path = file.path();
  const auto& meta = file.metadata();
  auto tag = meta.find("format");
  check(tag != meta.end() && tag->second == kFormatTag, path,
        "not a nibble packed model (no '{}' metadata): give a Hugging Face checkpoint directory or a file written "
        "by `nibble quantize`",
        kFormatTag);
  auto json_of = [&](const char* key) {
    auto it = meta.find(key);
    check(it != meta.end(), path, "metadata '{}' is missing", key);
    return parse_json(it->second, fmt::format("{} (metadata {})", path, key));
  };
  const ModelConfig c = ModelConfig::from_json(json_of("nibble.config"), path + " (metadata nibble.config)");
  const quant::Recipe recipe = quant::Recipe::from_json(json_of("nibble.recipe"), path + " (metadata nibble.recipe)");
  recipe.validate(c);
  PackedReader r(file, recipe);
  const int64_t H = c.hidden_size;
  std::vector<float> embedding = r.floats("model.embed_tokens.weight", {c.vocab_size, H});
  std::vector<Layer> layers;
  for (int l = 0; l < int(c.num_layers); ++l) layers.push_back(read_layer(r, c, l));
  std::vector<float> final_norm = r.floats("model.norm.weight", {H});
  std::unique_ptr<Linear> head = c.tie_word_embeddings
                                     ? std::make_unique<DenseLinear>(H, c.vocab_size, embedding, std::vector<float>{})
                                     : r.linear("lm_head", c.vocab_size, H, false, std::nullopt);
  r.check_all_read();
  auto m = std::make_unique<Model>(c, path, std::move(embedding), std::move(layers), std::move(final_norm),
                                   std::move(head));
  m->set_kv_format(recipe.kv);
  m->set_fp16_activations(recipe.fp16_activations);
  m->metadata() = meta;
  return m;
}

std::optional<TokenizerFiles> packed_tokenizer_files(const SafetensorsFile& file) {
  if (!file.has("tokenizer.json")) return std::nullopt;
  auto text = [&](const char* name) {
    if (!file.has(name)) return std::string();
    const TensorInfo& t = file.get(name);
    return std::string(reinterpret_cast<const char*>(t.data), t.nbytes);
  };
  const auto config = file.metadata().find("nibble.config");
  return TokenizerFiles{text("tokenizer.json"), text("tokenizer_config.json"),
                        config == file.metadata().end() ? std::string() : config->second, std::string()};
}

}  // namespace nibble
