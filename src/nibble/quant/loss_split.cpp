#include "nibble/quant/loss_split.h"

#include <fmt/format.h>

#include "nibble/core/error.h"
#include "nibble/quant/quant_linear.h"
#include "nibble/quant/quantize_model.h"

namespace nibble::quant {

namespace {

// One full cache per distinct format; K of layer l lives in the cache of k_formats[l], V in v_formats[l]'s.
class MixedKVCache final : public KVCache {
 public:
  MixedKVCache(const ModelConfig& c, std::vector<KVFormat> k_formats, std::vector<KVFormat> v_formats,
               int64_t capacity)
      : KVCache(c.num_layers, c.kv_dim(), capacity) {
    check(int64_t(k_formats.size()) == c.num_layers && int64_t(v_formats.size()) == c.num_layers, "mixed KV cache",
          "{} K and {} V formats for {} layers", k_formats.size(), v_formats.size(), c.num_layers);
    auto index_of = [&](const KVFormat& f) {
      f.validate("mixed KV cache");
      for (size_t i = 0; i < formats_.size(); ++i)
        if (formats_[i] == f) return i;
      formats_.push_back(f);
      caches_.push_back(make_kv_cache(c.num_layers, c.kv_dim(), c.head_dim, capacity, f));
      return formats_.size() - 1;
    };
    for (int64_t l = 0; l < c.num_layers; ++l) {
      k_cache_.push_back(index_of(k_formats[size_t(l)]));
      v_cache_.push_back(index_of(v_formats[size_t(l)]));
    }
  }
  MixedKVCache(const MixedKVCache& o)
      : KVCache(o), formats_(o.formats_), k_cache_(o.k_cache_), v_cache_(o.v_cache_) {
    for (const auto& c : o.caches_) caches_.push_back(c->clone());
  }

  std::unique_ptr<KVCache> clone() const override { return std::make_unique<MixedKVCache>(*this); }

  void write(int layer, int64_t pos, int64_t n, const float* k, const float* v) override {
    KVCache& kc = *caches_[k_cache_[size_t(layer)]];
    KVCache& vc = *caches_[v_cache_[size_t(layer)]];
    if (&kc == &vc) return kc.write(layer, pos, n, k, v);
    // Apart, each cache stores its part in both halves; the other half is never read.
    kc.write(layer, pos, n, k, k);
    vc.write(layer, pos, n, v, v);
  }

  void read(int layer, int64_t n, float* k, float* v) const override {
    if (k_cache_[size_t(layer)] == v_cache_[size_t(layer)]) return caches_[k_cache_[size_t(layer)]]->read(layer, n, k, v);
    scratch_.resize(size_t(n * kv_dim_));
    caches_[k_cache_[size_t(layer)]]->read(layer, n, k, scratch_.data());
    caches_[v_cache_[size_t(layer)]]->read(layer, n, scratch_.data(), v);
  }

  int64_t bytes_per_token() const override {
    int64_t b = 0;
    for (int64_t l = 0; l < num_layers_; ++l)
      b += (caches_[k_cache_[size_t(l)]]->bytes_per_token() + caches_[v_cache_[size_t(l)]]->bytes_per_token()) /
           (2 * num_layers_);
    return b;
  }

 private:
  std::vector<KVFormat> formats_;
  std::vector<std::unique_ptr<KVCache>> caches_;
  std::vector<size_t> k_cache_, v_cache_;
  mutable std::vector<float> scratch_;  // a cache belongs to one sequence: reads do not run concurrently
};

QuantLinear& quantized(Linear& l, int layer, LinearSlot slot) {
  auto* q = dynamic_cast<QuantLinear*>(&l);
  check(q != nullptr, "loss split", "layer {} {} is not quantized", layer, linear_slot_name(slot));
  return *q;
}

std::unique_ptr<Linear>& slot_of(Layer& layer, LinearSlot slot, int l) {
  check(layer.experts.size() == 1, "loss split", "layer {} is a MoE layer: the split covers dense models", l);
  switch (slot) {
    case LinearSlot::QKV: return layer.qkv;
    case LinearSlot::O: return layer.o;
    case LinearSlot::GateUp: return layer.experts[0].gate_up;
    case LinearSlot::Down: return layer.experts[0].down;
    case LinearSlot::Router: break;
  }
  throw Error("loss split", "no router in a dense layer");
}

}  // namespace

std::unique_ptr<KVCache> make_mixed_kv_cache(const ModelConfig& c, std::vector<KVFormat> k_formats,
                                             std::vector<KVFormat> v_formats, int64_t capacity) {
  return std::make_unique<MixedKVCache>(c, std::move(k_formats), std::move(v_formats), capacity);
}

void restore_layer(Model& q, Model& fp, int l) {
  q.layers()[size_t(l)] = std::move(fp.layers()[size_t(l)]);
}

void restore_activations(Model& q, LinearSlot slot) {
  for (int l = 0; l < int(q.layers().size()); ++l) {
    std::unique_ptr<Linear>& s = slot_of(q.layers()[size_t(l)], slot, l);
    QuantLinear& ql = quantized(*s, l, slot);
    LinearQuantSpec spec = ql.spec();
    spec.act.reset();
    s = std::make_unique<QuantLinear>(spec, ql.perm(), ql.main(), ql.keepers(), ql.keeper_fp16(), ql.bias());
  }
}

void restore_weights(Model& q, Model& fp, LinearSlot slot) {
  check(slot == LinearSlot::QKV || slot == LinearSlot::O, "loss split",
        "{} weights cannot be restored: their channel order was folded into the layer before", linear_slot_name(slot));
  for (int l = 0; l < int(q.layers().size()); ++l) {
    std::unique_ptr<Linear>& s = slot_of(q.layers()[size_t(l)], slot, l);
    const QuantLinear& ql = quantized(*s, l, slot);
    const auto* d = dynamic_cast<const DenseLinear*>(slot_of(fp.layers()[size_t(l)], slot, l).get());
    check(d != nullptr, "loss split", "layer {} {} of the FP model is not full precision", l, linear_slot_name(slot));
    const int64_t N = d->out_features(), K = d->in_features();
    std::vector<float> w = gather_columns(d->weight(), N, K, ql.perm());
    if (ql.spec().group_hadamard) rotate_groups(w.data(), N, K, K - ql.spec().keeper, ql.spec().weight.group);
    s = QuantLinear::activation_only(ql.spec(), N, K, ql.perm(), std::move(w), d->bias());
  }
}

}  // namespace nibble::quant
