// SHA-256 (OpenSSL's libcrypto), fed piece by piece: identifies a checkpoint's exact weights and a
// quantization run's inputs.
#pragma once

#include <memory>
#include <string>
#include <string_view>

struct evp_md_ctx_st;

namespace nibble {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(std::string_view bytes);
  std::string hex();  // the digest in lower-case hex; call once

 private:
  evp_md_ctx_st* ctx_;
};

}  // namespace nibble
