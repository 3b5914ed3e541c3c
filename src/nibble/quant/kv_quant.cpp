#include "nibble/quant/kv_quant.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "nibble/core/error.h"
#include "nibble/core/half.h"

namespace nibble::quant {

FormatSpec kv_format_spec(const KVFormat& f, int64_t head_dim) {
  check(f.bits == 4 || f.bits == 8, "KVCache", "KV cache bits must be 4, 8, 16 or 32, not {}", f.bits);
  return FormatSpec{f.bits == 4 ? Format::Int4Asym : Format::Int8Asym, int(head_dim), 1, f.clip};
}

namespace {

class IntKVCache final : public KVCache {
 public:
  IntKVCache(int64_t layers, int64_t kv_dim, int64_t head_dim, int64_t capacity, const KVFormat& f)
      : KVCache(layers, kv_dim, capacity), spec_(kv_format_spec(f, head_dim)), head_dim_(head_dim),
        hadamard_(f.hadamard), layers_(size_t(layers)) {
    check(kv_dim % head_dim == 0, "KVCache", "kv_dim {} is not a multiple of head_dim {}", kv_dim, head_dim);
    check(!hadamard_ || (head_dim & (head_dim - 1)) == 0, "KVCache",
          "a Hadamard-rotated KV cache needs a power-of-two head_dim, not {}", head_dim);
  }

  std::unique_ptr<KVCache> clone() const override { return std::make_unique<IntKVCache>(*this); }

  void write(int layer, int64_t pos, int64_t n, const float* k, const float* v) override {
    check(pos + n <= capacity_, "KVCache", "{} tokens exceed the cache capacity of {}", pos + n, capacity_);
    check_finite(k, n, kv_dim_, "KV cache (K)");
    check_finite(v, n, kv_dim_, "KV cache (V)");
    Store& s = layers_[size_t(layer)];
    s.resize(size_t((pos + n) * kv_dim_), size_t((pos + n) * (kv_dim_ / head_dim_)));
    encode(k, pos, n, s.k_codes, s.k_scales);
    encode(v, pos, n, s.v_codes, s.v_scales);
  }

  void read(int layer, int64_t n, float* k, float* v) const override {
    const Store& s = layers_[size_t(layer)];
    decode(s.k_codes, s.k_scales, n, k);
    decode(s.v_codes, s.v_scales, n, v);
  }

  int64_t bytes_per_token() const override {
    // Packed codes plus an fp16 scale and a uint8 zero per head, for K and V of every layer.
    const int64_t heads = kv_dim_ / head_dim_;
    return num_layers_ * 2 * (kv_dim_ * format_bits(spec_.format) / 8 + heads * 3);
  }

 private:
  struct Store {
    std::vector<uint8_t> k_codes, v_codes;      // one code per element (the reference layout)
    std::vector<GroupScale> k_scales, v_scales;  // one per token and head
    void resize(size_t codes, size_t groups) {
      if (k_codes.size() >= codes) return;
      k_codes.resize(codes);
      v_codes.resize(codes);
      k_scales.resize(groups);
      v_scales.resize(groups);
    }
  };

  void encode(const float* x, int64_t pos, int64_t n, std::vector<uint8_t>& codes,
              std::vector<GroupScale>& scales) const {
    const int64_t heads = kv_dim_ / head_dim_;
    std::vector<float> head(static_cast<size_t>(head_dim_));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        std::copy_n(x + t * kv_dim_ + h * head_dim_, head_dim_, head.begin());
        if (hadamard_) hadamard_transform(head.data(), head_dim_);
        scales[size_t((pos + t) * heads + h)] =
            encode_group(spec_, head.data(), head_dim_, codes.data() + (pos + t) * kv_dim_ + h * head_dim_);
      }
  }

  void decode(const std::vector<uint8_t>& codes, const std::vector<GroupScale>& scales, int64_t n, float* out) const {
    const int64_t heads = kv_dim_ / head_dim_;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < heads; ++h)
      {
        float* o = out + t * kv_dim_ + h * head_dim_;
        decode_group(spec_.format, codes.data() + t * kv_dim_ + h * head_dim_, head_dim_, scales[size_t(t * heads + h)], o);
        if (hadamard_) hadamard_transform(o, head_dim_);
      }
  }

  FormatSpec spec_;
  int64_t head_dim_;
  bool hadamard_;
  std::vector<Store> layers_;
};

// K as BlockKeyFormat says; V in a cache of the integer format `f` (which also stores a copy of K,
// never read: the simulation's price for reusing it).
class BlockKeyKVCache final : public KVCache {
 public:
  BlockKeyKVCache(int64_t layers, int64_t kv_dim, int64_t head_dim, int64_t capacity, const KVFormat& f,
                  const BlockKeyFormat& k)
      : KVCache(layers, kv_dim, capacity), spec_(kv_format_spec(f, k.per_channel ? k.block : head_dim)),
        head_dim_(head_dim), key_(k), values_(make_int_kv_cache(layers, kv_dim, head_dim, capacity, f)),
        keys_(size_t(layers)), quantized_(size_t(layers), 0) {
    check(k.block > 0, "KVCache", "K blocks of {} tokens", k.block);
    check(!k.hadamard || (head_dim & (head_dim - 1)) == 0, "KVCache",
          "a Hadamard-rotated KV cache needs a power-of-two head_dim, not {}", head_dim);
  }
  BlockKeyKVCache(const BlockKeyKVCache& o)
      : KVCache(o), spec_(o.spec_), head_dim_(o.head_dim_), key_(o.key_), values_(o.values_->clone()),
        keys_(o.keys_), quantized_(o.quantized_) {}

  std::unique_ptr<KVCache> clone() const override { return std::make_unique<BlockKeyKVCache>(*this); }

  void write(int layer, int64_t pos, int64_t n, const float* k, const float* v) override {
    int64_t& quantized = quantized_[size_t(layer)];
    check(pos >= quantized, "KVCache", "position {} rewrites a quantized K block (tokens before {})", pos, quantized);
    values_->write(layer, pos, n, v, v);
    std::vector<float>& keys = keys_[size_t(layer)];
    keys.resize(size_t((pos + n) * kv_dim_));
    std::copy_n(k, n * kv_dim_, keys.begin() + pos * kv_dim_);
    // The blocks that end at or before this write's first token are complete: quantize them now.
    if (key_.residual) quantized = std::max(quantized, pos / key_.block * key_.block);
  }

  void read(int layer, int64_t n, float* k, float* v) const override {
    std::vector<float> unused(size_t(n * kv_dim_));
    values_->read(layer, n, unused.data(), v);
    const std::vector<float>& keys = keys_[size_t(layer)];
    const int64_t quantized = key_.residual ? std::min(quantized_[size_t(layer)], n) : n;
    for (int64_t start = 0; start < quantized; start += key_.block)
      fake_quantize_block(keys.data() + start * kv_dim_, std::min(key_.block, quantized - start), k + start * kv_dim_);
    for (int64_t i = quantized * kv_dim_; i < n * kv_dim_; ++i) k[i] = round_fp16(keys[size_t(i)]);
  }

  int64_t bytes_per_token() const override {
    // V as `f`; K: the same codes, and an fp16 scale + uint8 zero per group (a channel per block of
    // tokens, or a head per token). The fp16 residual is per sequence, not per token: not counted.
    const int64_t heads = kv_dim_ / head_dim_;
    const int64_t k_bytes = kv_dim_ * format_bits(spec_.format) / 8 + (key_.per_channel ? kv_dim_ * 3 / key_.block : heads * 3);
    return values_->bytes_per_token() / 2 + num_layers_ * k_bytes;
  }

 private:
  // Rows [t, kv_dim] of K through the block's quantization, back in the channel basis.
  void fake_quantize_block(const float* rows, int64_t t, float* out) const {
    const int64_t heads = kv_dim_ / head_dim_;
    std::vector<float> x(size_t(t * kv_dim_));
    std::copy_n(rows, t * kv_dim_, x.begin());
    if (key_.hadamard)
      for (int64_t r = 0; r < t * heads; ++r) hadamard_transform(x.data() + r * head_dim_, head_dim_);
    std::vector<float> group(size_t(std::max(t, head_dim_))), deq(group.size());
    std::vector<uint8_t> codes(group.size());
    // A group is one channel over the block's tokens, or one head vector of one token.
    const int64_t groups = key_.per_channel ? kv_dim_ : t * heads, size = key_.per_channel ? t : head_dim_;
    for (int64_t g = 0; g < groups; ++g) {
      auto at = [&](int64_t i) { return key_.per_channel ? i * kv_dim_ + g : g * head_dim_ + i; };
      for (int64_t i = 0; i < size; ++i) group[size_t(i)] = x[size_t(at(i))];
      const GroupScale s = encode_group(spec_, group.data(), size, codes.data());
      decode_group(spec_.format, codes.data(), size, s, deq.data());
      for (int64_t i = 0; i < size; ++i) x[size_t(at(i))] = deq[size_t(i)];
    }
    if (key_.hadamard)
      for (int64_t r = 0; r < t * heads; ++r) hadamard_transform(x.data() + r * head_dim_, head_dim_);
    std::copy(x.begin(), x.end(), out);
  }

  FormatSpec spec_;
  int64_t head_dim_;
  BlockKeyFormat key_;
  std::unique_ptr<KVCache> values_;
  std::vector<std::vector<float>> keys_;  // every layer's K rows as written (fp32)
  std::vector<int64_t> quantized_;        // per layer: tokens [0, quantized) are in quantized blocks
};

}  // namespace

std::string BlockKeyFormat::describe() const {
  return fmt::format("K {} in blocks of {} tokens{}{}", per_channel ? "per channel" : "per token", block,
                     residual ? ", fp16 residual" : ", no residual", hadamard ? ", Hadamard" : ", no Hadamard");
}

std::unique_ptr<KVCache> make_block_key_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim,
                                                 int64_t capacity, const KVFormat& f, const BlockKeyFormat& k) {
  return std::make_unique<BlockKeyKVCache>(num_layers, kv_dim, head_dim, capacity, f, k);
}

std::unique_ptr<KVCache> make_int_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim, int64_t capacity,
                                           const KVFormat& f) {
  return std::make_unique<IntKVCache>(num_layers, kv_dim, head_dim, capacity, f);
}

}  // namespace nibble::quant
