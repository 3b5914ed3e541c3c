#include "nibble/quant/quant_linear.h"

#include "nibble/backend/cpu/ops.h"
#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/core/parallel.h"
#include "nibble/quant/hadamard.h"

namespace nibble::quant {

const char* keeper_precision_name(KeeperPrecision p) {
  switch (p) {
    case KeeperPrecision::Fp16: return "fp16";
    case KeeperPrecision::Int8: return "int8";
    case KeeperPrecision::Fp8E4M3: return "fp8-e4m3";
    case KeeperPrecision::Fp8E5M2: return "fp8-e5m2";
  }
  return "?";
}

KeeperPrecision parse_keeper_precision(const std::string& name, const std::string& where) {
  for (auto p : {KeeperPrecision::Fp16, KeeperPrecision::Int8, KeeperPrecision::Fp8E4M3, KeeperPrecision::Fp8E5M2})
    if (name == keeper_precision_name(p)) return p;
  // Atom's numeric --keeper_precision values.
  if (name == "0") return KeeperPrecision::Fp16;
  if (name == "1") return KeeperPrecision::Int8;
  if (name == "2") return KeeperPrecision::Fp8E4M3;
  if (name == "3") return KeeperPrecision::Fp8E5M2;
  throw Error(where, fmt::format("unknown keeper precision '{}' (fp16, int8, fp8-e4m3, fp8-e5m2 or 0..3)", name));
}

std::optional<FormatSpec> keeper_spec(KeeperPrecision p) {
  switch (p) {
    case KeeperPrecision::Fp16: return std::nullopt;
    case KeeperPrecision::Int8: return FormatSpec{Format::Int8Sym, 0, 1, 1.0f};
    case KeeperPrecision::Fp8E4M3: return FormatSpec{Format::Fp8E4M3, 0, 1, 1.0f};
    case KeeperPrecision::Fp8E5M2: return FormatSpec{Format::Fp8E5M2, 0, 1, 1.0f};
  }
  return std::nullopt;
}

void rotate_groups(float* x, int64_t rows, int64_t K, int64_t main, int64_t group) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < main; g += group) hadamard_transform(x + r * K + g, group);
}

void quantize_activations(float* x, int64_t rows, int64_t K, const LinearQuantSpec& spec) {
  const int64_t main = K - spec.keeper;
  if (spec.group_hadamard) rotate_groups(x, rows, K, main, spec.weight.group);
  if (!spec.act) return;
  const std::optional<FormatSpec> keep = keeper_spec(spec.keeper_precision);
  // A NaN or inf activation throws from inside the loop (fake_quantize_rows checks every row).
  parallel_for(rows, [&](int64_t r) {
    float* xr = x + r * K;
    if (main > 0) fake_quantize_rows(xr, 1, main, *spec.act, "activations");
    if (spec.keeper == 0) return;
    if (keep) fake_quantize_rows(xr + main, 1, spec.keeper, *keep, "activation keepers");
    else
      for (int64_t c = main; c < K; ++c) xr[c] = round_fp16(xr[c]);
  }, rows > 8);
}

void quantize_keepers(const std::vector<float>& weight, int64_t N, int64_t K, const LinearQuantSpec& spec,
                      std::optional<QuantizedMatrix>* keepers, std::vector<uint16_t>* keeper_fp16,
                      const std::string& where) {
  keepers->reset();
  keeper_fp16->clear();
  if (spec.keeper == 0) return;
  const int64_t main = K - spec.keeper;
  std::vector<float> part(size_t(N * spec.keeper));
  for (int64_t n = 0; n < N; ++n)
    std::copy_n(weight.begin() + n * K + main, spec.keeper, part.begin() + n * spec.keeper);
  if (const auto ks = keeper_spec(spec.keeper_precision)) {
    *keepers = quantize_rows(part.data(), N, spec.keeper, *ks, where + " keepers");
  } else {
    check_finite(part.data(), N, spec.keeper, where + " keepers");
    for (float v : part) keeper_fp16->push_back(float_to_fp16(v));
  }
}

QuantLinear::QuantLinear(LinearQuantSpec spec, std::vector<int32_t> perm, QuantizedMatrix main,
                         std::optional<QuantizedMatrix> keepers, std::vector<uint16_t> keeper_fp16,
                         std::vector<float> bias)
    : Linear(main.cols + spec.keeper, main.rows), spec_(spec), perm_(std::move(perm)), main_(std::move(main)),
      keepers_(std::move(keepers)), keeper_fp16_(std::move(keeper_fp16)), bias_(std::move(bias)) {
  const int64_t N = out_features(), K = in_features();
  check(perm_.empty() || int64_t(perm_.size()) == K, "QuantLinear", "permutation has {} entries for {} channels",
        perm_.size(), K);
  check(bias_.empty() || int64_t(bias_.size()) == N, "QuantLinear", "bias has {} values for {} outputs",
        bias_.size(), N);
  if (keepers_) {
    check(keepers_->rows == N && keepers_->cols == spec_.keeper, "QuantLinear", "keeper block has the wrong shape");
  } else if (spec_.keeper > 0) {
    check(int64_t(keeper_fp16_.size()) == N * spec_.keeper, "QuantLinear", "fp16 keeper block has the wrong size");
  }
}

const std::vector<float>& QuantLinear::dequantized() const {
  std::call_once(dequantize_once_, [this] {
    if (!weight_.empty()) return;  // activation_only: the weight is given, full precision
    const int64_t N = out_features(), K = in_features(), M = main_.cols;
    weight_.resize(size_t(N * K));
    std::vector<float> main_values(size_t(N * M));
    if (M > 0) dequantize_rows(main_, main_values.data());
    std::vector<float> keep_values(size_t(N * spec_.keeper));
    if (keepers_) {
      dequantize_rows(*keepers_, keep_values.data());
    } else {
      for (size_t i = 0; i < keep_values.size(); ++i) keep_values[i] = fp16_to_float(keeper_fp16_[i]);
    }
    for (int64_t n = 0; n < N; ++n) {
      std::copy_n(main_values.begin() + n * M, M, weight_.begin() + n * K);
      std::copy_n(keep_values.begin() + n * spec_.keeper, spec_.keeper, weight_.begin() + n * K + M);
    }
  });
  return weight_;
}

QuantLinear::QuantLinear(LinearQuantSpec spec, int64_t N, int64_t K, std::vector<int32_t> perm,
                         std::vector<float> weight, std::vector<float> bias)
    : Linear(K, N), spec_(spec), perm_(std::move(perm)), bias_(std::move(bias)), weight_(std::move(weight)) {
  check(int64_t(weight_.size()) == N * K, "QuantLinear", "weight has {} values for {}x{}", weight_.size(), N, K);
}

std::unique_ptr<QuantLinear> QuantLinear::activation_only(LinearQuantSpec spec, int64_t N, int64_t K,
                                                          std::vector<int32_t> perm, std::vector<float> weight,
                                                          std::vector<float> bias) {
  spec.quantize_weights = false;
  return std::unique_ptr<QuantLinear>(
      new QuantLinear(spec, N, K, std::move(perm), std::move(weight), std::move(bias)));
}

void QuantLinear::forward(const float* x, int64_t rows, float* y) const {
  const int64_t K = in_features(), N = out_features();
  std::vector<float> xq(size_t(rows * K));
  if (perm_.empty()) {
    std::copy_n(x, rows * K, xq.begin());
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < K; ++c) xq[size_t(r * K + c)] = x[r * K + perm_[size_t(c)]];
  }
  quantize_activations(xq.data(), rows, K, spec_);
  float beta = 0.0f;
  if (!bias_.empty()) {
    for (int64_t r = 0; r < rows; ++r) std::copy(bias_.begin(), bias_.end(), y + r * N);
    beta = 1.0f;
  }
  cpu::gemm_nt(rows, N, K, xq.data(), dequantized().data(), beta, y);
}

int64_t QuantLinear::storage_bytes() const {
  auto matrix_bytes = [](const QuantizedMatrix& q) {
    const int64_t code_bytes = format_bits(q.spec.format) == 4 ? q.codes.size() / 2 : q.codes.size();
    return int64_t(code_bytes) + int64_t(q.scales.size()) * scale_bytes(q.spec.format) + int64_t(q.zeros.size());
  };
  int64_t bytes = matrix_bytes(main_) + int64_t(keeper_fp16_.size()) * 2 + int64_t(bias_.size()) * 2 +
                  int64_t(perm_.size()) * 4;
  if (keepers_) bytes += matrix_bytes(*keepers_);
  return bytes;
}

std::unique_ptr<QuantLinear> quantize_linear_rtn(const std::vector<float>& weight, int64_t N, int64_t K,
                                                 const LinearQuantSpec& spec, std::vector<int32_t> perm,
                                                 std::vector<float> bias, const std::string& where) {
  const int64_t M = K - spec.keeper;
  std::vector<float> main(size_t(N * M));
  for (int64_t n = 0; n < N; ++n) std::copy_n(weight.begin() + n * K, M, main.begin() + n * M);
  QuantizedMatrix qm = quantize_rows(main.data(), N, M, spec.weight, where);
  std::optional<QuantizedMatrix> keepers;
  std::vector<uint16_t> keeper_fp16;
  quantize_keepers(weight, N, K, spec, &keepers, &keeper_fp16, where);
  return std::make_unique<QuantLinear>(spec, std::move(perm), std::move(qm), std::move(keepers),
                                       std::move(keeper_fp16), std::move(bias));
}

}  // namespace nibble::quant
