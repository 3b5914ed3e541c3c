// Model: the one forward pass for every architecture and every quantization recipe.
// Linear layers, activation quantizers and the KV cache are pluggable (model/linear.h,
// model/kv_cache.h); the forward pass itself never changes for a quantized model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "nibble/core/half.h"
#include "nibble/model/communicator.h"
#include "nibble/model/config.h"
#include "nibble/model/kv_cache.h"
#include "nibble/model/linear.h"

namespace nibble {

class Checkpoint;

// Which linear of a layer; q/k/v are fused into one product, and so are gate/up.
enum class LinearSlot { QKV, O, GateUp, Down, Router };
const char* linear_slot_name(LinearSlot s);

struct Expert {
  std::unique_ptr<Linear> gate_up;  // [2*intermediate, hidden]: gate rows then up rows
  std::unique_ptr<Linear> down;     // [hidden, intermediate]
};

struct Layer {
  std::vector<float> attn_norm;      // [hidden]
  std::unique_ptr<Linear> qkv;       // [q_dim + 2*kv_dim, hidden] (+ bias for Qwen2)
  std::unique_ptr<Linear> o;         // [hidden, q_dim]
  std::vector<float> mlp_norm;       // [hidden]
  std::vector<Expert> experts;       // one for a dense MLP; num_experts for Mixtral
  std::unique_ptr<Linear> router;    // Mixtral only: [num_experts, hidden]
  // [num_kv_heads, head_dim, head_dim] or empty: K of each KV head and the queries of its group are
  // multiplied by this orthogonal R after RoPE (q·k unchanged), so the cache quantizes R·k
  // (a rotation learned for the integer cache: quant/kv_rotation.h).
  std::vector<float> k_rotation;
};

// One sequence's part of a batch: `tokens` are appended to `cache` (positions continue from
// cache->length()). all_logits: logits for every token (scoring), else only for the last (generation).
struct Step {
  KVCache* cache = nullptr;
  std::span<const int32_t> tokens;
  bool all_logits = false;
};

// Sees the input of every linear layer as the forward pass runs (calibration statistics).
// `expert` is -1 outside a MoE; `x` is [rows, in_features] in the model's channel order.
using LinearObserver =
    std::function<void(int layer, LinearSlot slot, int expert, const float* x, int64_t rows)>;
// Sees each layer's attention inputs after RoPE, before the cache: q [rows, q_dim], k and v
// [rows, kv_dim] (calibration of the KV cache's rotations).
using AttentionObserver = std::function<void(int layer, const float* q, const float* k, const float* v, int64_t rows)>;

class Model {
 public:
  // Loads a Hugging Face checkpoint directory (config.json + *.safetensors, sharded or not).
  static std::unique_ptr<Model> load(const std::filesystem::path& path);
  // The same checkpoint (`ckpt` = Checkpoint::open(path)) without its weights: every tensor's
  // name, shape and dtype checked against the config from the headers, nothing read; the layers
  // are empty slots that load_layer fills and release_layer empties again (quantize_checkpoint
  // holds one layer at a time). No embedding, final norm or LM head: it runs only run_layer.
  static std::unique_ptr<Model> open_layers(const std::filesystem::path& path, const Checkpoint& ckpt);
  void load_layer(const Checkpoint& ckpt, int l);
  void release_layer(int l) { layers_[size_t(l)] = Layer{}; }

  const ModelConfig& config() const { return config_; }
  const std::string& source() const { return source_; }

  // A new empty cache in this model's KV format (or from the cache factory), able to grow to max_tokens.
  std::unique_ptr<KVCache> new_cache(int64_t max_tokens) const;
  // Caches from `make` instead of the KV format (the loss split's per-layer K/V formats); null: the
  // format. The CPU reference only: the CUDA executor keeps its paged cache in the KV format.
  using CacheFactory = std::function<std::unique_ptr<KVCache>(int64_t max_tokens)>;
  void set_cache_factory(CacheFactory make) { cache_factory_ = std::move(make); }
  void set_kv_format(KVFormat f) {
    f.validate("KV cache");
    kv_format_ = f;
  }
  const KVFormat& kv_format() const { return kv_format_; }
  // Round every activation the way a model running in fp16 stores it (Atom's code does): the
  // embedding, each norm, linear and attention output, SwiGLU and the residual stream after each add.
  void set_fp16_activations(bool on) { fp16_activations_ = on; }
  bool fp16_activations() const { return fp16_activations_; }
  // Makes this model one rank's shard of a tensor-parallel group (backend/shard_plan.h builds the
  // shard): forward then calls `tp.comm`'s collectives, which every rank must reach together.
  void set_tensor_parallel(const TensorParallelRank& tp) { tp_ = tp; }
  const TensorParallelRank& tensor_parallel() const { return tp_; }

  // Appends each step's tokens to its cache and returns logits [rows, vocab], rows in batch order:
  // n rows for a step with all_logits, 1 otherwise.
  std::vector<float> forward(std::span<const Step> batch);

  // Layer-by-layer access for calibration: hidden [n, hidden_size] of one sequence whose tokens
  // sit at positions 0..n-1; run_layer transforms it in place through layer `l` (fresh cache).
  std::vector<float> embed(std::span<const int32_t> tokens) const;
  void embed(std::span<const int32_t> tokens, float* hidden) const;  // into [n, hidden_size]
  void run_layer(int l, float* hidden, int64_t n);
  // Runs layer `l` on `hidden` only as far as the observer needs: every linear's input is seen,
  // the down_proj products (whose outputs nobody reads then) are skipped; `hidden` is unchanged.
  void observe_layer(int l, const float* hidden, int64_t n);
  // Final norm + LM head on `rows` hidden states (a shard's vocabulary slices gathered from every rank).
  std::vector<float> head(const float* hidden, int64_t rows) const;

  void set_observer(LinearObserver obs) { observer_ = std::move(obs); }
  void set_attention_observer(AttentionObserver obs) { attention_observer_ = std::move(obs); }

  // The weights, for quantization passes that replace linears in place.
  std::vector<Layer>& layers() { return layers_; }
  const std::vector<Layer>& layers() const { return layers_; }
  Linear& lm_head() { return *lm_head_; }
  const Linear& lm_head() const { return *lm_head_; }
  const std::vector<float>& embedding() const { return embedding_; }
  std::vector<float>& embedding() { return embedding_; }
  // `head` replaces the LM head, which stops sharing the embedding's values (a residual rotation
  // folds the final norm into the head only): the packed file then stores both.
  void untie_word_embeddings(std::unique_ptr<Linear> head) {
    config_.tie_word_embeddings = false;
    lm_head_ = std::move(head);
  }
  std::vector<float>& final_norm() { return final_norm_; }
  const std::vector<float>& final_norm() const { return final_norm_; }

  int64_t parameter_count() const;
  // Bytes the weights take as stored (quantized linears at their packed size).
  int64_t storage_bytes() const;
  int64_t layer_storage_bytes(int l) const;  // layer l's part of it

  Model(ModelConfig config, std::string source);
  // Assembles a model from parts (the packed-file loader).
  Model(ModelConfig config, std::string source, std::vector<float> embedding, std::vector<Layer> layers,
        std::vector<float> final_norm, std::unique_ptr<Linear> lm_head);
  // Free-form facts about where the weights came from (the packed file's recipe and metadata).
  std::map<std::string, std::string>& metadata() { return metadata_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct SeqView;
  // With need_output false only the observer's view matters: down_proj is skipped, `hidden` is garbage after.
  void layer_forward(int l, const std::vector<SeqView>& seqs, float* hidden, int64_t rows, bool need_output = true);
  void attention(int l, const std::vector<SeqView>& seqs, float* qkv, float* out);
  void mlp(int l, const float* x, int64_t rows, float* out, bool need_output = true);
  // The fp16 storage of an activation when fp16_activations_ is on; nothing otherwise.
  void store(float* x, int64_t n) const {
    if (fp16_activations_) round_fp16(x, n);
  }

  ModelConfig config_;
  std::string source_;
  KVFormat kv_format_;
  CacheFactory cache_factory_;
  bool fp16_activations_ = false;
  TensorParallelRank tp_;          // comm null: the whole model
  std::vector<float> embedding_;  // [vocab, hidden]; a shard's rows from tp_.vocab_begin
  std::vector<Layer> layers_;
  std::vector<float> final_norm_;
  std::unique_ptr<Linear> lm_head_;  // shares embedding_'s values when tied
  std::vector<double> rope_inv_freq_;
  LinearObserver observer_;
  AttentionObserver attention_observer_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace nibble
