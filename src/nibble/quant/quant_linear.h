// A linear layer in Atom's layout: input channels gathered by a permutation so the `keeper`
// most salient channels sit at the end; the first K-keeper channels quantized in groups, the
// keepers at their own precision, on both the weight and (per token, at run time) the activation
// side. Weights are held as codes + scales (what the packed file stores) and dequantized once, on
// the first CPU product (a GPU backend reads the codes, so a 70B model never holds its fp32 weights
// on the host), so a model loaded from the packed file computes bit for bit what the simulated
// model computes.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "nibble/model/linear.h"
#include "nibble/quant/format.h"

namespace nibble::quant {

// Precision of the keeper channels, as Atom's --keeper_precision 0..3.
enum class KeeperPrecision { Fp16, Int8, Fp8E4M3, Fp8E5M2 };
const char* keeper_precision_name(KeeperPrecision p);
KeeperPrecision parse_keeper_precision(const std::string& name, const std::string& where);
// The format.h spec keepers are stored in (Int8: one scale per row over the keeper block, no
// clip, as Atom); nullopt for Fp16, which is a plain cast.
std::optional<FormatSpec> keeper_spec(KeeperPrecision p);

// How one linear's operands are quantized.
struct LinearQuantSpec {
  FormatSpec weight;                 // main part (first K - keeper columns)
  std::optional<FormatSpec> act;     // per-token activation quantizer of the main part; none = FP
  int64_t keeper = 0;                // trailing channels kept at keeper precision
  KeeperPrecision keeper_precision = KeeperPrecision::Int8;
  bool quantize_weights = true;      // false: weights stay full precision (calibration passes)
  // Quantize each group of the main part in a Hadamard-rotated basis: activations H·x at run time,
  // weights stored as W·Hᵀ (exact, since H is orthonormal). Needs equal power-of-two groups.
  bool group_hadamard = false;
};

// Rotates every `group`-wide block of the first `main` values of each of `rows` rows (stride K).
void rotate_groups(float* x, int64_t rows, int64_t K, int64_t main, int64_t group);

// Applies the activation side of `spec` to rows of x ([rows, K], already permuted), in place.
void quantize_activations(float* x, int64_t rows, int64_t K, const LinearQuantSpec& spec);

class QuantLinear final : public Linear {
 public:
  // `main`: [N, K-keeper] codes in spec.weight's format. `keepers`: [N, keeper] codes (INT8/FP8)
  // or, for Fp16 keepers, their fp16 bits in keeper_fp16. perm: K channel indices (empty = identity):
  // permuted channel c reads input channel perm[c].
  QuantLinear(LinearQuantSpec spec, std::vector<int32_t> perm, QuantizedMatrix main,
              std::optional<QuantizedMatrix> keepers, std::vector<uint16_t> keeper_fp16, std::vector<float> bias);

  void forward(const float* x, int64_t rows, float* y) const override;
  int64_t storage_bytes() const override;

  const LinearQuantSpec& spec() const { return spec_; }
  const std::vector<int32_t>& perm() const { return perm_; }
  const QuantizedMatrix& main() const { return main_; }
  const std::optional<QuantizedMatrix>& keepers() const { return keepers_; }
  const std::vector<uint16_t>& keeper_fp16() const { return keeper_fp16_; }
  const std::vector<float>& bias() const { return bias_; }
  // A linear whose weights stay full precision ([N, K], already permuted) but whose input is
  // gathered and quantized as `spec` says: what GPTQ's Hessian pass runs.
  static std::unique_ptr<QuantLinear> activation_only(LinearQuantSpec spec, int64_t N, int64_t K,
                                                      std::vector<int32_t> perm, std::vector<float> weight,
                                                      std::vector<float> bias);
  // The dequantized weight [N, K] in permuted channel order (what the product uses), made on the
  // first call (thread-safe).
  const std::vector<float>& dequantized() const;

 private:
  QuantLinear(LinearQuantSpec spec, int64_t N, int64_t K, std::vector<int32_t> perm, std::vector<float> weight,
              std::vector<float> bias);

  LinearQuantSpec spec_;
  std::vector<int32_t> perm_;
  QuantizedMatrix main_;
  std::optional<QuantizedMatrix> keepers_;
  std::vector<uint16_t> keeper_fp16_;
  std::vector<float> bias_;
  mutable std::once_flag dequantize_once_;
  mutable std::vector<float> weight_;
};

// Round-to-nearest quantization of a full-precision weight [N, K] (already permuted).
std::unique_ptr<QuantLinear> quantize_linear_rtn(const std::vector<float>& weight, int64_t N, int64_t K,
                                                 const LinearQuantSpec& spec, std::vector<int32_t> perm,
                                                 std::vector<float> bias, const std::string& where);

// Splits a dequantized-or-not [N, K] weight into its main and keeper parts, quantized with `spec`
// (used by RTN and after GPTQ has fixed the values). Keeper values are stored at keeper precision.
void quantize_keepers(const std::vector<float>& weight, int64_t N, int64_t K, const LinearQuantSpec& spec,
                      std::optional<QuantizedMatrix>* keepers, std::vector<uint16_t>* keeper_fp16,
                      const std::string& where);

}  // namespace nibble::quant
