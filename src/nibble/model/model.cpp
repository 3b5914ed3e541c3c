#include "nibble/model/model.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "nibble/backend/cpu/ops.h"
#include "nibble/core/error.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"

namespace nibble {

const char* linear_slot_name(LinearSlot s) {
  switch (s) {
    case LinearSlot::QKV: return "qkv";
    case LinearSlot::O: return "o";
    case LinearSlot::GateUp: return "gate_up";
    case LinearSlot::Down: return "down";
    case LinearSlot::Router: return "router";
  }
  return "?";
}

// One sequence inside a batch: its rows of the hidden state and the positions they sit at.
struct Model::SeqView {
  KVCache* cache;
  int64_t row;    // first row in the batch
  int64_t n;      // rows (new tokens)
  int64_t start;  // position of the first new token
};

Model::Model(ModelConfig config, std::string source)
    : config_(std::move(config)), source_(std::move(source)), rope_inv_freq_(cpu::rope_inv_freq(config_)) {}

Model::Model(ModelConfig config, std::string source, std::vector<float> embedding, std::vector<Layer> layers,
             std::vector<float> final_norm, std::unique_ptr<Linear> lm_head)
    : Model(std::move(config), std::move(source)) {
  embedding_ = std::move(embedding);
  layers_ = std::move(layers);
  final_norm_ = std::move(final_norm);
  lm_head_ = std::move(lm_head);
}

namespace {

// Reads the linears of a Hugging Face checkpoint; `prefix` is e.g. "model.layers.3.".
class CheckpointReader {
 public:
  // headers_only: every tensor is checked (name, shape, dtype, bytes present) but none is read:
  // tensors come back empty and linears null.
  CheckpointReader(const Checkpoint& ckpt, bool headers_only = false) : ckpt_(ckpt), headers_only_(headers_only) {}

  std::vector<float> tensor(const std::string& name, std::vector<int64_t> shape) {
    params_ += std::accumulate(shape.begin(), shape.end(), int64_t(1), std::multiplies<>());
    read_.insert(name);
    if (!headers_only_) return ckpt_.load_f32(name, shape);
    ckpt_.check_tensor(name, shape);
    return {};
  }
  // Marks a tensor the model knowingly does without (it is recomputed or duplicated).
  void skip(const std::string& name) { read_.insert(name); }
  // Every tensor of the checkpoint must have been read or skipped.
  void check_all_read() const { nibble::check_all_read(ckpt_.names(), read_, ckpt_.where()); }
  int storage_bytes(const std::string& name) const { return int(dtype_size(ckpt_.get(name).dtype)); }

  // Stacks the output rows of several linears sharing one input (q/k/v, gate/up) into one layer;
  // biases are loaded where the checkpoint has them (all or none).
  std::unique_ptr<Linear> stacked(const std::vector<std::string>& names, const std::vector<int64_t>& outs,
                                  int64_t in, bool bias_required) {
    std::vector<float> w, b;
    int64_t total_out = 0;
    const bool has_bias = ckpt_.has(names[0] + ".bias");
    check(!bias_required || has_bias, ckpt_.where(), "tensor '{}.bias' not found (the config asks for biases)",
          names[0]);
    for (size_t i = 0; i < names.size(); ++i) {
      std::vector<float> wi = tensor(names[i] + ".weight", {outs[i], in});
      w.insert(w.end(), wi.begin(), wi.end());
      if (has_bias) {
        std::vector<float> bi = tensor(names[i] + ".bias", {outs[i]});
        b.insert(b.end(), bi.begin(), bi.end());
      }
      total_out += outs[i];
    }
    if (headers_only_) return nullptr;
    return std::make_unique<DenseLinear>(in, total_out, std::move(w), std::move(b),
                                         storage_bytes(names[0] + ".weight"));
  }

  int64_t params() const { return params_; }

 private:
  const Checkpoint& ckpt_;
  bool headers_only_;
  int64_t params_ = 0;
  std::set<std::string> read_;
};

Layer read_layer(CheckpointReader& r, const ModelConfig& c, int64_t l) {
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const std::string p = fmt::format("model.layers.{}.", l);
  Layer layer;
  layer.attn_norm = r.tensor(p + "input_layernorm.weight", {H});
  layer.mlp_norm = r.tensor(p + "post_attention_layernorm.weight", {H});
  layer.qkv = r.stacked({p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"},
                        {c.q_dim(), c.kv_dim(), c.kv_dim()}, H, c.attention_bias);
  layer.o = r.stacked({p + "self_attn.o_proj"}, {H}, c.q_dim(), false);
  if (c.arch == Arch::Mixtral) {
    const std::string moe = p + "block_sparse_moe.";
    layer.router = r.stacked({moe + "gate"}, {c.num_experts}, H, false);
    for (int64_t e = 0; e < c.num_experts; ++e) {
      const std::string ex = fmt::format("{}experts.{}.", moe, e);
      layer.experts.push_back({r.stacked({ex + "w1", ex + "w3"}, {I, I}, H, false),
                               r.stacked({ex + "w2"}, {H}, I, false)});
    }
  } else {
    layer.experts.push_back({r.stacked({p + "mlp.gate_proj", p + "mlp.up_proj"}, {I, I}, H, false),
                             r.stacked({p + "mlp.down_proj"}, {H}, I, false)});
  }
  return layer;
}

// The whole model through `r`; keep_weights false (a headers-only reader) keeps only empty layer slots.
std::unique_ptr<Model> read_model(CheckpointReader& r, const Checkpoint& ckpt, const ModelConfig& c,
                                  const std::string& source, bool keep_weights) {
  auto m = std::make_unique<Model>(c, source);
  const int64_t H = c.hidden_size;
  std::vector<float> embedding = r.tensor("model.embed_tokens.weight", {c.vocab_size, H});
  std::vector<Layer> layers;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer layer = read_layer(r, c, l);
    layers.push_back(keep_weights ? std::move(layer) : Layer{});
  }
  std::vector<float> final_norm = r.tensor("model.norm.weight", {H});
  std::unique_ptr<Linear> head;
  if (c.tie_word_embeddings || !ckpt.has("lm_head.weight")) {
    check(c.tie_word_embeddings, ckpt.where(), "tensor 'lm_head.weight' not found and tie_word_embeddings is false");
    if (keep_weights)
      head = std::make_unique<DenseLinear>(H, c.vocab_size, embedding, std::vector<float>{},
                                           r.storage_bytes("model.embed_tokens.weight"));
    r.skip("lm_head.weight");  // some tied checkpoints store a copy; transformers ignores it too
  } else {
    head = r.stacked({"lm_head"}, {c.vocab_size}, H, false);
  }
  // Older checkpoints store each layer's RoPE frequencies; they are recomputed from the config.
  for (const std::string& name : ckpt.names())
    if (name.ends_with(".self_attn.rotary_emb.inv_freq")) r.skip(name);
  r.check_all_read();
  if (!keep_weights) return std::make_unique<Model>(c, source, std::vector<float>{}, std::move(layers),
                                                    std::vector<float>{}, nullptr);
  return std::make_unique<Model>(c, source, std::move(embedding), std::move(layers), std::move(final_norm),
                                 std::move(head));
}

// [rows, cols_kept] from every rank's [rows, width] (rank r's columns at r·width), the columns
// past cols_kept (the last rank's padding) dropped.
std::vector<float> gather_columns(Communicator& comm, const float* x, int64_t rows, int64_t width, int64_t cols_kept) {
  const int64_t n = rows * width;
  std::vector<float> all(size_t(n * comm.world())), out(size_t(rows * cols_kept));
  comm.all_gather(x, n, all.data());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols_kept; ++c) out[size_t(r * cols_kept + c)] = all[size_t(c / width * n + r * width + c % width)];
  return out;
}

ModelConfig checkpoint_config(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  check(fs::is_directory(path), path.string(),
        "not a model directory (expected a Hugging Face checkpoint folder with config.json and *.safetensors)");
  check(fs::exists(path / "config.json"), path.string(), "no config.json in this directory");
  return ModelConfig::from_file(path / "config.json");
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  check(fs::exists(path), path.string(), "no such file or folder");
  if (fs::is_regular_file(path)) return load_packed_model(path);
  const ModelConfig c = checkpoint_config(path);
  const Checkpoint ckpt = Checkpoint::open(path);
  CheckpointReader r(ckpt);
  return read_model(r, ckpt, c, path.string(), true);
}

std::unique_ptr<Model> Model::open_layers(const std::filesystem::path& path, const Checkpoint& ckpt) {
  const ModelConfig c = checkpoint_config(path);
  CheckpointReader r(ckpt, /*headers_only=*/true);
  return read_model(r, ckpt, c, path.string(), false);
}

void Model::load_layer(const Checkpoint& ckpt, int l) {
  CheckpointReader r(ckpt);
  layers_[size_t(l)] = read_layer(r, config_, l);
}

int64_t Model::parameter_count() const {
  int64_t n = int64_t(embedding_.size() + final_norm_.size());
  auto linear = [](const Linear& l) { return l.in_features() * l.out_features(); };
  for (const Layer& layer : layers_) {
    n += int64_t(layer.attn_norm.size() + layer.mlp_norm.size()) + linear(*layer.qkv) + linear(*layer.o);
    if (layer.router) n += linear(*layer.router);
    for (const Expert& e : layer.experts) n += linear(*e.gate_up) + linear(*e.down);
  }
  if (!config_.tie_word_embeddings) n += linear(*lm_head_);
  return n;
}

int64_t Model::storage_bytes() const {
  // Embedding and norms as 16-bit values; every linear at its own storage size.
  int64_t n = int64_t(embedding_.size() + final_norm_.size()) * 2;
  for (int l = 0; l < int(layers_.size()); ++l) n += layer_storage_bytes(l);
  if (!config_.tie_word_embeddings) n += lm_head_->storage_bytes();
  return n;
}

int64_t Model::layer_storage_bytes(int l) const {
  const Layer& layer = layers_[size_t(l)];
  int64_t n = int64_t(layer.attn_norm.size() + layer.mlp_norm.size()) * 2 + layer.qkv->storage_bytes() +
              layer.o->storage_bytes() + int64_t(layer.k_rotation.size() * sizeof(float));
  if (layer.router) n += layer.router->storage_bytes();
  for (const Expert& e : layer.experts) n += e.gate_up->storage_bytes() + e.down->storage_bytes();
  return n;
}

std::unique_ptr<KVCache> Model::new_cache(int64_t max_tokens) const {
  if (cache_factory_) return cache_factory_(max_tokens);
  return make_kv_cache(config_.num_layers, config_.kv_dim(), config_.head_dim, max_tokens, kv_format_);
}

std::vector<float> Model::embed(std::span<const int32_t> tokens) const {
  std::vector<float> h(tokens.size() * size_t(config_.hidden_size));
  embed(tokens, h.data());
  return h;
}

void Model::embed(std::span<const int32_t> tokens, float* hidden) const {
  const int64_t H = config_.hidden_size;
  std::fill_n(hidden, int64_t(tokens.size()) * H, 0.0f);
  for (size_t i = 0; i < tokens.size(); ++i) {
    check(tokens[i] >= 0 && tokens[i] < config_.vocab_size, "forward", "token id {} at position {} is outside the vocabulary (0..{})",
          tokens[i], i, config_.vocab_size - 1);
    // A shard holds rows vocab_begin.. of the table; the other ranks hold the rest (zeros here).
    const int64_t row = tokens[i] - tp_.vocab_begin;
    if (row >= 0 && row < int64_t(embedding_.size()) / H)
      std::copy_n(embedding_.begin() + row * H, H, hidden + int64_t(i) * H);
  }
  store(hidden, int64_t(tokens.size()) * H);
  if (tp_.comm) tp_.comm->all_reduce_sum(hidden, int64_t(tokens.size()) * H);  // one nonzero row per token: exact
}

namespace {
// x [rows, heads·d] := R_g·x per head, g = head / heads_per_rotation (R [groups, d, d]).
void rotate_heads(const std::vector<float>& rotation, float* x, int64_t rows, int64_t heads, int64_t d,
                  int64_t heads_per_rotation) {
  std::vector<double> y(static_cast<size_t>(d));
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * d;
      const float* r = rotation.data() + h / heads_per_rotation * d * d;
      for (int64_t i = 0; i < d; ++i) {
        double acc = 0;
        for (int64_t j = 0; j < d; ++j) acc += double(r[i * d + j]) * double(v[j]);
        y[size_t(i)] = acc;
      }
      for (int64_t i = 0; i < d; ++i) v[i] = float(y[size_t(i)]);
    }
}
}  // namespace

void Model::attention(int l, const std::vector<SeqView>& seqs, float* qkv, float* out) {
  const ModelConfig& c = config_;
  const int64_t qd = c.q_dim(), kvd = c.kv_dim(), stride = qd + 2 * kvd;
  for (const SeqView& s : seqs) {
    const int64_t total = s.start + s.n;
    std::vector<float> q(size_t(s.n * qd)), k(size_t(s.n * kvd)), v(size_t(s.n * kvd));
    for (int64_t i = 0; i < s.n; ++i) {
      const float* row = qkv + (s.row + i) * stride;
      std::copy_n(row, qd, q.data() + i * qd);
      std::copy_n(row + qd, kvd, k.data() + i * kvd);
      std::copy_n(row + qd + kvd, kvd, v.data() + i * kvd);
      cpu::apply_rope(q.data() + i * qd, c.num_heads, c.head_dim, s.start + i, rope_inv_freq_, fp16_activations_);
      if (!kv_format_.k_before_rope)
        cpu::apply_rope(k.data() + i * kvd, c.num_kv_heads, c.head_dim, s.start + i, rope_inv_freq_,
                        fp16_activations_);
    }
    if (attention_observer_) attention_observer_(l, q.data(), k.data(), v.data(), s.n);
    const std::vector<float>& rotation = layers_[size_t(l)].k_rotation;
    if (!rotation.empty()) {
      check(!kv_format_.k_before_rope, "attention", "layer {} rotates K after RoPE; its cache cannot hold K before RoPE", l);
      rotate_heads(rotation, q.data(), s.n, c.num_heads, c.head_dim, c.num_heads / c.num_kv_heads);
      rotate_heads(rotation, k.data(), s.n, c.num_kv_heads, c.head_dim, 1);
    }
    s.cache->write(l, s.start, s.n, k.data(), v.data());
    std::vector<float> K(size_t(total * kvd)), V(size_t(total * kvd));
    s.cache->read(l, total, K.data(), V.data());
    if (kv_format_.k_before_rope)
      for (int64_t j = 0; j < total; ++j)
        cpu::apply_rope(K.data() + j * kvd, c.num_kv_heads, c.head_dim, j, rope_inv_freq_, fp16_activations_);
    cpu::attention(q.data(), K.data(), V.data(), s.n, s.start, c.num_heads, c.num_kv_heads, c.head_dim,
                   c.sliding_window, out + s.row * qd, fp16_activations_);
  }
}

void Model::mlp(int l, const float* x, int64_t rows, float* out, bool need_output) {
  Layer& layer = layers_[size_t(l)];
  const int64_t H = config_.hidden_size, I = config_.intermediate_size;
  auto run_expert = [&](int e, const float* xe, int64_t n, float* ye) {
    const Expert& ex = layer.experts[size_t(e)];
    const int tag = layer.router ? e : -1;
    if (observer_) observer_(l, LinearSlot::GateUp, tag, xe, n);
    std::vector<float> gu(size_t(n * 2 * I)), act(size_t(n * I));
    ex.gate_up->forward(xe, n, gu.data());
    store(gu.data(), int64_t(gu.size()));
    cpu::swiglu(gu.data(), n, I, act.data(), fp16_activations_);
    if (observer_) observer_(l, LinearSlot::Down, tag, act.data(), n);
    if (need_output) ex.down->forward(act.data(), n, ye);
  };
  if (!layer.router) {
    run_expert(0, x, rows, out);
    return;
  }
  // Mixtral: softmax over experts, keep the top k, renormalise their weights to sum to one.
  const int64_t E = config_.num_experts, K = config_.num_experts_per_tok;
  std::vector<float> logits(size_t(rows * E));
  if (observer_) observer_(l, LinearSlot::Router, -1, x, rows);
  layer.router->forward(x, rows, logits.data());
  std::vector<std::vector<int64_t>> rows_of(static_cast<size_t>(E));
  std::vector<std::vector<float>> weight_of(static_cast<size_t>(E));
  for (int64_t r = 0; r < rows; ++r) {
    float* p = logits.data() + r * E;
    cpu::softmax(p, E);
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += p[order[size_t(k)]];
    for (int64_t k = 0; k < K; ++k) {
      rows_of[size_t(order[size_t(k)])].push_back(r);
      weight_of[size_t(order[size_t(k)])].push_back(p[order[size_t(k)]] / sum);
    }
  }
  std::fill(out, out + rows * H, 0.0f);
  for (int64_t e = 0; e < E; ++e) {
    const auto& idx = rows_of[size_t(e)];
    if (idx.empty()) continue;
    const int64_t n = int64_t(idx.size());
    std::vector<float> xe(size_t(n * H)), ye(need_output ? size_t(n * H) : 0);  // no output: down_proj is skipped
    for (int64_t i = 0; i < n; ++i) std::copy_n(x + idx[size_t(i)] * H, H, xe.data() + i * H);
    run_expert(int(e), xe.data(), n, ye.data());
    if (!need_output) continue;
    for (int64_t i = 0; i < n; ++i) {
      const float w = weight_of[size_t(e)][size_t(i)];
      float* o = out + idx[size_t(i)] * H;
      for (int64_t j = 0; j < H; ++j) o[j] += w * ye[size_t(i * H + j)];
    }
  }
}

void Model::layer_forward(int l, const std::vector<SeqView>& seqs, float* hidden, int64_t rows, bool need_output) {
  const ModelConfig& c = config_;
  Layer& layer = layers_[size_t(l)];
  const int64_t H = c.hidden_size, qd = c.q_dim();
  std::vector<float> xn(size_t(rows * H)), qkv(size_t(rows * (qd + 2 * c.kv_dim()))), attn(size_t(rows * qd)),
      y(size_t(rows * H));
  cpu::rms_norm(hidden, layer.attn_norm.data(), rows, H, c.rms_norm_eps, xn.data(), fp16_activations_);
  if (observer_) observer_(l, LinearSlot::QKV, -1, xn.data(), rows);
  layer.qkv->forward(xn.data(), rows, qkv.data());
  store(qkv.data(), int64_t(qkv.size()));
  attention(l, seqs, qkv.data(), attn.data());
  if (tp_.gather_attention) attn = gather_columns(*tp_.comm, attn.data(), rows, qd, qd * tp_.comm->world());
  if (observer_) observer_(l, LinearSlot::O, -1, attn.data(), rows);
  layer.o->forward(attn.data(), rows, y.data());
  // Row-parallel products: every rank's partial sum, reduced before the fp16 store as one product is.
  if (tp_.comm) tp_.comm->all_reduce_sum(y.data(), rows * H);
  store(y.data(), rows * H);
  for (int64_t i = 0; i < rows * H; ++i) hidden[i] += y[size_t(i)];
  store(hidden, rows * H);
  cpu::rms_norm(hidden, layer.mlp_norm.data(), rows, H, c.rms_norm_eps, xn.data(), fp16_activations_);
  mlp(l, xn.data(), rows, y.data(), need_output);
  if (need_output) {
    if (tp_.comm) tp_.comm->all_reduce_sum(y.data(), rows * H);
    store(y.data(), rows * H);
    for (int64_t i = 0; i < rows * H; ++i) hidden[i] += y[size_t(i)];
    store(hidden, rows * H);
  }
}

void Model::run_layer(int l, float* hidden, int64_t n) {
  auto cache = new_cache(n);
  layer_forward(l, {SeqView{cache.get(), 0, n, 0}}, hidden, n);
}

void Model::observe_layer(int l, const float* hidden, int64_t n) {
  auto cache = new_cache(n);
  std::vector<float> scratch(hidden, hidden + n * config_.hidden_size);
  layer_forward(l, {SeqView{cache.get(), 0, n, 0}}, scratch.data(), n, /*need_output=*/false);
}

std::vector<float> Model::head(const float* hidden, int64_t rows) const {
  const int64_t H = config_.hidden_size;
  std::vector<float> xn(size_t(rows * H)), logits(size_t(rows * config_.vocab_size));
  cpu::rms_norm(hidden, final_norm_.data(), rows, H, config_.rms_norm_eps, xn.data(), fp16_activations_);
  if (!tp_.comm) {
    lm_head_->forward(xn.data(), rows, logits.data());
    return logits;
  }
  // Vocabulary-parallel: this rank's slice of every row, padded to the common width, gathered.
  const int64_t width = tp_.vocab_per_rank;
  std::vector<float> slice(size_t(rows * width), 0.0f), part(size_t(rows * lm_head_->out_features()));
  lm_head_->forward(xn.data(), rows, part.data());
  for (int64_t r = 0; r < rows; ++r)
    std::copy_n(part.begin() + r * lm_head_->out_features(), lm_head_->out_features(), slice.begin() + r * width);
  return gather_columns(*tp_.comm, slice.data(), rows, width, config_.vocab_size);
}

std::vector<float> Model::forward(std::span<const Step> batch) {
  const int64_t H = config_.hidden_size;
  std::vector<SeqView> seqs;
  std::vector<int32_t> tokens;
  for (const Step& s : batch) {
    check(s.cache != nullptr && !s.tokens.empty(), "forward", "every step needs a cache and at least one token");
    check(s.cache->length() + int64_t(s.tokens.size()) <= s.cache->capacity(), "forward",
          "sequence of {} tokens exceeds its cache capacity {}", s.cache->length() + int64_t(s.tokens.size()),
          s.cache->capacity());
    seqs.push_back({s.cache, int64_t(tokens.size()), int64_t(s.tokens.size()), s.cache->length()});
    tokens.insert(tokens.end(), s.tokens.begin(), s.tokens.end());
  }
  const int64_t rows = int64_t(tokens.size());
  std::vector<float> hidden = embed(tokens);
  for (int l = 0; l < int(config_.num_layers); ++l) layer_forward(l, seqs, hidden.data(), rows);
  for (const SeqView& s : seqs) s.cache->commit(s.start + s.n);

  // Only the rows whose logits were asked for go through the LM head.
  std::vector<float> selected;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqView& s = seqs[i];
    const int64_t first = batch[i].all_logits ? s.row : s.row + s.n - 1;
    selected.insert(selected.end(), hidden.begin() + first * H, hidden.begin() + (s.row + s.n) * H);
  }
  return head(selected.data(), int64_t(selected.size()) / H);
}

}  // namespace nibble
