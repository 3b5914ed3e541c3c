#include "nibble/quant/kv_quant.h"

#include <cmath>

#include "nibble/core/error.h"

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

}  // namespace

std::unique_ptr<KVCache> make_int_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim, int64_t capacity,
                                           const KVFormat& f) {
  return std::make_unique<IntKVCache>(num_layers, kv_dim, head_dim, capacity, f);
}

}  // namespace nibble::quant
