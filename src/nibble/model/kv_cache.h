// Per-sequence KV cache of all layers. The attention writes K/V rows [n, kv_dim] and reads
// the first n rows back in fp32; a quantized cache quantizes on write and dequantizes on read.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace nibble {

struct KVFormat {
  int bits = 32;                  // 32: fp32 reference; 16: fp16; 8 or 4: integer (quant/format.h)
  bool k_before_rope = false;     // store K unrotated and rotate when read (Atom's KV4 order)
  float clip = 1.0f;              // integer formats: clip ratio of each token-and-head group
  // Integer formats: quantize each head vector in a Walsh-Hadamard-rotated basis (undone on read),
  // which spreads outlier channels over the whole group; attention itself is unchanged.
  bool hadamard = false;
  std::string describe() const;
  // Throws nibble::Error(where, ...) for bits other than 4, 8, 16, 32 or a clip outside (0, 1].
  void validate(const std::string& where) const;
  bool operator==(const KVFormat&) const = default;
};

class KVCache {
 public:
  KVCache(int64_t num_layers, int64_t kv_dim, int64_t capacity)
      : num_layers_(num_layers), kv_dim_(kv_dim), capacity_(capacity) {}
  virtual ~KVCache() = default;

  int64_t length() const { return length_; }     // tokens stored (same in every layer)
  int64_t capacity() const { return capacity_; }
  int64_t kv_dim() const { return kv_dim_; }
  // Forgets every token from position n on (reuse a shared prefix, e.g. one question's context).
  void truncate(int64_t n);
  virtual std::unique_ptr<KVCache> clone() const = 0;

  // Writes rows for positions [pos, pos+n) of layer `layer`; k and v are [n, kv_dim].
  // The model calls write for every layer, then commit(pos + n).
  virtual void write(int layer, int64_t pos, int64_t n, const float* k, const float* v) = 0;
  // Reads positions [0, n) of a layer into k and v ([n, kv_dim] each), in fp32.
  virtual void read(int layer, int64_t n, float* k, float* v) const = 0;
  void commit(int64_t new_length) { length_ = new_length; }
  virtual int64_t bytes_per_token() const = 0;

 protected:
  int64_t num_layers_, kv_dim_, capacity_, length_ = 0;
};

// fp32 (bits 32) or fp16 (bits 16) storage.
std::unique_ptr<KVCache> make_float_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t capacity, int bits);
// The cache for any format: float storage, or integer codes through quant/format.h.
std::unique_ptr<KVCache> make_kv_cache(int64_t num_layers, int64_t kv_dim, int64_t head_dim, int64_t capacity,
                                       const KVFormat& f);

}  // namespace nibble
