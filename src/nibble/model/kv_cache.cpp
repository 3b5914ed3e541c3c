#include "nibble/model/kv_cache.h"

#include <cstring>

#include <fmt/format.h>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/quant/kv_quant.h"

namespace nibble {

std::string KVFormat::describe() const {
  std::string s = bits == 32 ? "fp32" : bits == 16 ? "fp16" : fmt::format("int{}-asym", bits);
  if (bits < 16) s += k_before_rope ? " (K before RoPE" : " (K after RoPE";
  if (bits < 16 && clip < 1) s += fmt::format(", clip {}", clip);
  if (bits < 16) s += hadamard ? ", Hadamard)" : ")";
  return s;
}

void KVFormat::validate(const std::string& where) const {
  check(bits == 4 || bits == 8 || bits == 16 || bits == 32, where, "--kv-bits must be 4, 8, 16 or 32, not {}", bits);
  check(clip > 0 && clip <= 1, where, "--kv-clip must be in (0, 1], not {}", clip);
}

void KVCache::truncate(int64_t n) {
  check(n >= 0 && n <= length_, "KVCache::truncate", "cannot truncate {} tokens to {}", length_, n);
  length_ = n;
}

namespace {

// Float storage: fp32 keeps the values exactly, fp16 rounds them as an fp16 cache would.
class FloatKVCache final : public KVCache {
 public:
  FloatKVCache(int64_t layers, int64_t kv_dim, int64_t capacity, bool half)
      : KVCache(layers, kv_dim, capacity), half_(half), k_(size_t(layers)), v_(size_t(layers)) {}

  std::unique_ptr<KVCache> clone() const override { return std::make_unique<FloatKVCache>(*this); }

  void write(int layer, int64_t pos, int64_t n, const float* k, const float* v) override {
    check(pos + n <= capacity_, "KVCache", "{} tokens exceed the cache capacity of {}", pos + n, capacity_);
    auto& K = k_[size_t(layer)];
    auto& V = v_[size_t(layer)];
    const size_t need = size_t((pos + n) * kv_dim_);
    if (K.size() < need) {
      K.resize(need);
      V.resize(need);
    }
    for (int64_t i = 0; i < n * kv_dim_; ++i) {
      K[size_t(pos * kv_dim_ + i)] = half_ ? round_fp16(k[i]) : k[i];
      V[size_t(pos * kv_dim_ + i)] = half_ ? round_fp16(v[i]) : v[i];
    }
  }

  void read(int layer, int64_t n, float* k, float* v) const override {
    std::memcpy(k, k_[size_t(layer)].data(), size_t(n * kv_dim_) * sizeof(float));
    std::memcpy(v, v_[size_t(layer)].data(), size_t(n * kv_dim_) * sizeof(float));
  }

  int64_t bytes_per_token() const override { return num_layers_ * kv_dim_ * 2 * (half_ ? 2 : 4); }

 private:
  bool half_;
  std::vector<std::vector<float>> k_, v_;
};

}  // namespace

std::unique_ptr<KVCache> make_float_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t capacity, int bits) {
  check(bits == 32 || bits == 16, "KVCache", "float cache bits must be 16 or 32, not {}", bits);
  return std::make_unique<FloatKVCache>(num_layers, kv_dim, capacity, bits == 16);
}

}  // namespace nibble

namespace nibble {
std::unique_ptr<KVCache> make_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim, int64_t capacity,
                                       const KVFormat& f) {
  if (f.bits == 32 || f.bits == 16) return make_float_kv_cache(num_layers, kv_dim, capacity, f.bits);
  return quant::make_int_kv_cache(num_layers, kv_dim, head_dim, capacity, f);
}
}  // namespace nibble
