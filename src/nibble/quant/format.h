// THE definition of every number format nibble quantizes to. The simulated forward pass, GPTQ,
// the packer, the CPU kernels and the CUDA kernels' tests all call these functions; there is no
// second copy anywhere.
//
// Vocabulary
//   group   `group` consecutive elements along K (the reduction dimension) share one scale;
//           `row_group` adjacent rows share it too (Atom's --weight_channel_group).
//   code    one byte per element holding the format's bit pattern:
//             INT sym   two's complement: int8_t(code) is the integer (INT4: -8..7, sign-extended)
//             INT asym  unsigned 0..2^b-1, with a per-group zero point
//             FP4       E2M1 (bit 3 = sign; the sign of a zero is kept, both zeros decode to 0)
//             FP8       E4M3 / E5M2
//   scale   per group, a float exactly representable in its storage type: fp16 (INT formats,
//           Fp4E2M1), E8M0 (Mxfp4), E4M3 times one fp32 tensor scale (Nvfp4).
//
// Arithmetic: float32, in the order written in the comments, every rounding to nearest with ties
// to even (torch.round, std::nearbyint in the default mode and CUDA's __float2int_rn agree).
// Encoding divides by the scale (x / scale, never x * (1 / scale)): a kernel that must match the
// CPU path bit for bit does the same.
//
// Scale rules shared by every format: an all-zero group gets scale 0 (E8M0: its smallest value,
// 2^-127), all codes encode 0.0 and decode to 0. A nonzero group whose scale would round to 0 in
// its storage type gets the smallest positive value instead (fp16 2^-24, E4M3 2^-9), so tiny and
// denormal groups still quantize to the nearest grid point; a scale above the storage type's
// largest finite value saturates there (fp16 65504), and the grid then clamps. The quantization
// always uses the stored (rounded) scale, so the simulated path equals the packed path bit for bit.
//
// Element and group functions never throw and are constexpr where the arithmetic allows (so CUDA
// code compiled with --expt-relaxed-constexpr can call them). They do not detect NaN/±inf: run
// check_finite() first (the matrix helpers at the bottom do), quantizing NaN must never pass
// silently. Their result for NaN input is a fixed code, not undefined behaviour.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/core/dtype.h"
#include "nibble/core/half.h"

namespace nibble::quant {

enum class Format : uint8_t {
  // Symmetric integer grids with an fp16 scale per group: x̂ = code · scale.
  //   Int4Sym:  Atom's RTN path.  scale = clip·absmax / 7,   code = clamp(rne(x / scale), -8, 7)
  //   Int8Sym:                     scale = clip·absmax / 127, code = clamp(rne(x / scale), -128, 127)
  //   Int4SymAtomGptq: Atom's GPTQ grid (--atom-compat). Atom computes scale = (xmax - xmin)·clip / 15
  //     with xmax = absmax, xmin = -absmax, i.e. scale = 2·clip·absmax / 15, stores
  //     q = clamp(rne(x / scale) + 8, 0, 15) and decodes (q - 8)·scale. That is exactly
  //     code = q - 8 = clamp(rne(x / scale), -8, 7) here, so both INT4 grids share codes, packing and
  //     kernels and differ only in the scale: the GPTQ grid tops out at 7·scale = 0.933·clip·absmax,
  //     the RTN grid at clip·absmax.
  Int4Sym,
  Int4SymAtomGptq,
  Int8Sym,
  // Asymmetric integer grids (KV cache: one group per token and head), fp16 scale + uint8 zero:
  //   hi = clip·max(x, 0), lo = clip·min(x, 0)           (the range always contains 0)
  //   scale = clip·(max(x, 0) - min(x, 0)) / (2^b - 1), zero = min(rne(-lo / scale), 2^b - 1)
  //   code = clamp(rne(x / scale) + zero, 0, 2^b - 1),  x̂ = (code - zero) · scale
  // Atom's RTN uses max(x) and min(x) without the 0; they differ only for groups whose values are
  // all of one sign, where Atom's grid clips most of the group.
  Int4Asym,
  Int8Asym,
  // E2M1 elements (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating at ±6): code = e2m1(x / step), x̂ =
  // e2m1_value(code) · step, where step is
  //   Fp4E2M1: an fp16 scale per group = clip·absmax / 6.
  //   Mxfp4:   (OCP MX v1.0) group 32, E8M0 scale 2^(floor(log2(absmax)) - 2), 2 being E2M1's
  //            largest exponent; so absmax/scale lies in [4, 8) and values beyond 6 clamp to ±6.
  //   Nvfp4:   group 16, E4M3 scale = e4m3((absmax / 6) / tensor_scale), step = scale · tensor_scale,
  //            tensor_scale = tensor_absmax / (6 · 448) in fp32 (see nvfp4_tensor_scale).
  Fp4E2M1,
  Mxfp4,
  Nvfp4,
  // Plain casts without a scale (keeper channels), round to nearest even and saturate to the
  // largest finite value (±inf too), like CUDA's __nv_cvt_float_to_fp8(..., __NV_SATFINITE, ...):
  //   Fp8E4M3: the OCP/NVIDIA "fn" variant: max 448, subnormals, no inf, NaN = 0x7f / 0xff.
  //   Fp8E5M2: IEEE-like: max 57344, subnormals, ±inf = 0x7c / 0xfc, NaN above.
  Fp8E4M3,
  Fp8E5M2,
};

struct FormatSpec {
  Format format = Format::Int4Sym;
  int group = 128;    // elements along K per scale; 0 = the whole row. Mxfp4 needs 32, Nvfp4 16.
  int row_group = 1;  // adjacent rows sharing each scale (Atom's --weight_channel_group)
  float clip = 1.0f;  // in (0, 1]: scales the group's range before the scale is chosen
                      // (INT formats and Fp4E2M1; must be 1 for the others)
};

// ---- Format properties ------------------------------------------------------------------------

constexpr int format_bits(Format f) {
  switch (f) {
    case Format::Int8Sym: case Format::Int8Asym: case Format::Fp8E4M3: case Format::Fp8E5M2: return 8;
    default: return 4;
  }
}

// Codes are two's complement integers (int8_t(code)); unpacking 4-bit codes sign-extends them.
constexpr bool format_signed_codes(Format f) {
  return f == Format::Int4Sym || f == Format::Int4SymAtomGptq || f == Format::Int8Sym;
}

constexpr bool format_is_asymmetric(Format f) { return f == Format::Int4Asym || f == Format::Int8Asym; }

// Bytes of one stored group scale: fp16 2, E8M0/E4M3 1, FP8 casts 0 (they have none).
// Asymmetric formats store a uint8 zero point beside each scale.
constexpr int scale_bytes(Format f) {
  switch (f) {
    case Format::Mxfp4: case Format::Nvfp4: return 1;
    case Format::Fp8E4M3: case Format::Fp8E5M2: return 0;
    default: return 2;
  }
}

std::string_view format_name(Format f);  // "int4", "int4-atom-gptq", "int8", "int4-asym", ...
Format parse_format(std::string_view name, const std::string& where);  // throws, listing the names
// Throws nibble::Error unless the spec is usable: group/clip/row_group rules above.
void validate_spec(const FormatSpec& spec, const std::string& where);

// ---- Rounding and the minifloat element types ----------------------------------------------------

// Nearest integer, ties to even (in the default round-to-nearest mode, which nibble never changes).
// NaN and ±inf pass through.
constexpr float round_half_even(float v) {
  const float a = v < 0 ? -v : v;
  if (!(a < 0x1p23f)) return v;  // already an integer (or NaN/inf)
  // Below 2^23, adding 2^23 leaves no fraction bits: the adder rounds to nearest, ties to even
  // (branch-free, so hot loops vectorize; equal to the floor-and-compare form on all 2^32 inputs).
  const float r = (a + 0x1p23f) - 0x1p23f;
  return v < 0 ? -r : r;
}

// 2^e as a normal float, -126 <= e <= 127.
constexpr float pow2(int e) { return std::bit_cast<float>(uint32_t(e + 127) << 23); }

// A small float: sign, exp_bits, man_bits, exponent bias, subnormals. Magnitude codes above
// max_finite are inf (the first, if has_inf) and NaN; nan_code is what NaN encodes to.
struct Minifloat {
  int exp_bits, man_bits, bias;
  uint8_t max_finite;
  bool has_inf;
  uint8_t nan_code;
};
inline constexpr Minifloat kE2M1{2, 1, 1, 0x07, false, 0x00};  // no NaN: NaN encodes as +0
inline constexpr Minifloat kE4M3{4, 3, 7, 0x7e, false, 0x7f};
inline constexpr Minifloat kE5M2{5, 2, 15, 0x7b, true, 0x7f};

// Nearest representable value, ties to even mantissa, saturating at ±max (±inf too).
constexpr uint8_t minifloat_encode(float x, Minifloat f) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return f.nan_code;
  const uint8_t sign = uint8_t((bits >> 31) << (f.exp_bits + f.man_bits));
  if (abs_bits == 0x7f800000u) return sign | f.max_finite;
  // e = floor(log2|x|), but not below the smallest normal exponent: under it the spacing is fixed.
  const int min_exp = 1 - f.bias;
  const int e = std::max(int(abs_bits >> 23) - 127, min_exp);
  // |x| in units of the spacing 2^(e - man_bits) at that exponent: exact, at most 2^(man_bits+1).
  const float units = round_half_even(std::bit_cast<float>(abs_bits) * pow2(f.man_bits - e));
  // (biased exponent - 1) << man_bits, plus units: the implicit bit and a carry into the next
  // binade (units == 2^(man_bits+1)) both land in the exponent field by themselves.
  const uint32_t mag = (uint32_t(e - min_exp) << f.man_bits) + uint32_t(units);
  return sign | uint8_t(std::min<uint32_t>(mag, f.max_finite));
}

constexpr float minifloat_decode(uint8_t code, Minifloat f) {
  const int width = f.exp_bits + f.man_bits;
  const int mag = code & ((1 << width) - 1);
  float v;
  if (mag > f.max_finite) {
    v = f.has_inf && mag == f.max_finite + 1 ? std::numeric_limits<float>::infinity()
                                             : std::numeric_limits<float>::quiet_NaN();
  } else {
    const int e = mag >> f.man_bits, m = mag & ((1 << f.man_bits) - 1);
    // subnormal (e = 0): m · 2^(1 - bias - man_bits); normal: (2^man_bits + m) · 2^(e - bias - man_bits)
    v = float(e == 0 ? m : (1 << f.man_bits) + m) * pow2((e == 0 ? 1 : e) - f.bias - f.man_bits);
  }
  return (code >> width) & 1 ? -v : v;
}

constexpr uint8_t e2m1_encode(float x) { return minifloat_encode(x, kE2M1); }
constexpr float e2m1_decode(uint8_t code) { return minifloat_decode(code, kE2M1); }
constexpr uint8_t fp8_e4m3_encode(float x) { return minifloat_encode(x, kE4M3); }
constexpr float fp8_e4m3_decode(uint8_t code) { return minifloat_decode(code, kE4M3); }
constexpr uint8_t fp8_e5m2_encode(float x) { return minifloat_encode(x, kE5M2); }
constexpr float fp8_e5m2_decode(uint8_t code) { return minifloat_decode(code, kE5M2); }

// MXFP4's shared scale as an E8M0 code (value 2^(code - 127)): floor(log2(absmax)) - 2, clamped to
// E8M0's smallest exponent -127 (absmax 0 and float subnormals land there). absmax finite, >= 0.
constexpr uint8_t mx_scale_code(float absmax) {
  const int floor_log2 = int(std::bit_cast<uint32_t>(absmax) >> 23 & 0xffu) - 127;  // -127 for 0/subnormal
  return uint8_t(std::max(floor_log2 - 2, -127) + 127);
}
constexpr float e8m0_decode(uint8_t code) {
  if (code == 0xff) return std::numeric_limits<float>::quiet_NaN();
  return code == 0 ? 0x1p-127f : std::bit_cast<float>(uint32_t(code) << 23);
}

// ---- Integer grids -------------------------------------------------------------------------------

constexpr uint8_t int_sym_encode(float x, float scale, int bits) {
  if (scale == 0) return 0;
  const float qmax = float((1 << (bits - 1)) - 1);
  float q = round_half_even(x / scale);
  q = q > qmax ? qmax : q;
  q = q >= -qmax - 1 ? q : -qmax - 1;  // NaN lands here too
  return uint8_t(int(q));
}
constexpr float int_sym_decode(uint8_t code, float scale) { return float(int8_t(code)) * scale; }

constexpr uint8_t int_asym_encode(float x, float scale, uint8_t zero, int bits) {
  if (scale == 0) return zero;
  const float qmax = float((1 << bits) - 1);
  float q = round_half_even(x / scale) + float(zero);
  q = q > qmax ? qmax : q;
  q = q >= 0 ? q : 0;  // NaN lands here too
  return uint8_t(q);
}
constexpr float int_asym_decode(uint8_t code, float scale, uint8_t zero) {
  return float(int(code) - int(zero)) * scale;
}

// ---- Groups --------------------------------------------------------------------------------------

// The range a scale is chosen from. Both ends start at 0, so min <= 0 <= max always.
struct GroupStats {
  float min = 0, max = 0;

  constexpr void add(float x) {
    min = x < min ? x : min;
    max = x > max ? x : max;
  }
  constexpr void add(const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) add(x[i]);
  }
  constexpr void merge(const GroupStats& o) {
    add(o.min);
    add(o.max);
  }
  constexpr float absmax() const { return max > -min ? max : -min; }
};

// A group's scale as encode/decode need it.
struct GroupScale {
  float scale = 0;         // the stored scale's value (see scale_to_bits); 1 for the FP8 casts
  float tensor_scale = 1;  // Nvfp4's fp32 per-tensor scale; 1 for every other format
  uint8_t zero = 0;        // asymmetric formats: the code of 0.0; 0 otherwise
};

// Rounds a scale to fp16 by the shared scale rules: 0 stays 0, a nonzero value never becomes 0
// (2^-24 instead) nor inf (65504 instead).
constexpr float fp16_scale(float raw) {
  if (raw == 0) return 0;
  const float s = round_fp16(raw);
  if (s == 0) return 0x1p-24f;
  return s > 65504.0f ? 65504.0f : s;
}

// NVFP4's fp32 tensor scale: the tensor's absmax maps to E2M1's 6 times E4M3's 448.
constexpr float nvfp4_tensor_scale(float tensor_absmax) { return tensor_absmax / (6.0f * 448.0f); }

// NVFP4's per-group E4M3 scale value (never 0 for a nonzero group: 2^-9 instead).
constexpr float nvfp4_group_scale(float absmax, float tensor_scale) {
  if (absmax == 0 || tensor_scale == 0) return 0;
  const float s = fp8_e4m3_decode(fp8_e4m3_encode(absmax / 6 / tensor_scale));
  return s == 0 ? 0x1p-9f : s;
}

// The scale for a group (or a row_group × group block) with range `stats`. `tensor_scale` is used
// by Nvfp4 only (nvfp4_tensor_scale of the whole tensor).
constexpr GroupScale choose_scale(const FormatSpec& spec, const GroupStats& stats, float tensor_scale = 1) {
  const float absmax = stats.absmax();
  switch (spec.format) {
    case Format::Int4Sym: return {fp16_scale(spec.clip * absmax / 7)};
    case Format::Int4SymAtomGptq: return {fp16_scale(2 * spec.clip * absmax / 15)};
    case Format::Int8Sym: return {fp16_scale(spec.clip * absmax / 127)};
    case Format::Int4Asym:
    case Format::Int8Asym: {
      const float qmax = float((1 << format_bits(spec.format)) - 1);
      // clip·(max - min) rather than clip·max - clip·min: no product feeds a sum, so no compiler
      // can fuse it into an FMA (g++ and nvcc fuse differently, and the GPU must match bit for bit).
      const float lo = spec.clip * stats.min;
      const float scale = fp16_scale(spec.clip * (stats.max - stats.min) / qmax);
      const float zero = scale == 0 ? 0 : std::min(round_half_even(-lo / scale), qmax);
      return {scale, 1, uint8_t(zero)};
    }
    case Format::Fp4E2M1: return {fp16_scale(spec.clip * absmax / 6)};
    case Format::Mxfp4: return {e8m0_decode(mx_scale_code(absmax))};
    case Format::Nvfp4: return {nvfp4_group_scale(absmax, tensor_scale), tensor_scale};
    case Format::Fp8E4M3:
    case Format::Fp8E5M2: return {1};
  }
  return {};
}

constexpr uint8_t encode_element(Format f, float x, const GroupScale& g) {
  switch (f) {
    case Format::Int4Sym:
    case Format::Int4SymAtomGptq: return int_sym_encode(x, g.scale, 4);
    case Format::Int8Sym: return int_sym_encode(x, g.scale, 8);
    case Format::Int4Asym: return int_asym_encode(x, g.scale, g.zero, 4);
    case Format::Int8Asym: return int_asym_encode(x, g.scale, g.zero, 8);
    case Format::Fp4E2M1:
    case Format::Mxfp4:
    case Format::Nvfp4: {
      const float step = g.scale * g.tensor_scale;
      return step == 0 ? 0 : e2m1_encode(x / step);
    }
    case Format::Fp8E4M3: return fp8_e4m3_encode(x);
    case Format::Fp8E5M2: return fp8_e5m2_encode(x);
  }
  return 0;
}

constexpr float decode_element(Format f, uint8_t code, const GroupScale& g) {
  switch (f) {
    case Format::Int4Sym:
    case Format::Int4SymAtomGptq:
    case Format::Int8Sym: return int_sym_decode(code, g.scale);
    case Format::Int4Asym:
    case Format::Int8Asym: return int_asym_decode(code, g.scale, g.zero);
    case Format::Fp4E2M1:
    case Format::Mxfp4:
    case Format::Nvfp4: return e2m1_decode(code) * (g.scale * g.tensor_scale);
    case Format::Fp8E4M3: return fp8_e4m3_decode(code);
    case Format::Fp8E5M2: return fp8_e5m2_decode(code);
  }
  return 0;
}

// Encodes n elements with a scale chosen from their own range (row_group is the caller's business:
// merge the block's GroupStats and use choose_scale + encode_element). Returns the scale.
inline GroupScale encode_group(const FormatSpec& spec, const float* x, int64_t n, uint8_t* codes,
                               float tensor_scale = 1) {
  GroupStats stats;
  stats.add(x, n);
  const GroupScale g = choose_scale(spec, stats, tensor_scale);
  for (int64_t i = 0; i < n; ++i) codes[i] = encode_element(spec.format, x[i], g);
  return g;
}

inline void decode_group(Format f, const uint8_t* codes, int64_t n, const GroupScale& g, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = decode_element(f, codes[i], g);
}

// The stored bits of a scale from choose_scale (exact): fp16 bits for the INT formats and Fp4E2M1,
// the E8M0 code for Mxfp4, the E4M3 code for Nvfp4 (its tensor scale is stored once, as fp32).
// FP8 casts store no scale.
inline uint16_t scale_to_bits(Format f, float scale) {
  switch (f) {
    case Format::Mxfp4: return scale == 0x1p-127f ? 0 : uint16_t(std::bit_cast<uint32_t>(scale) >> 23);
    case Format::Nvfp4: return fp8_e4m3_encode(scale);
    default: return float_to_fp16(scale);
  }
}
inline float scale_from_bits(Format f, uint16_t bits) {
  switch (f) {
    case Format::Mxfp4: return e8m0_decode(uint8_t(bits));
    case Format::Nvfp4: return fp8_e4m3_decode(uint8_t(bits));
    default: return fp16_to_float(bits);
  }
}

// ---- Packing -------------------------------------------------------------------------------------

// Two 4-bit codes per byte: element 2i in the low nibble, element 2i+1 in the high nibble.
// Signed INT4 codes are stored as two's complement nibbles (-8..7 -> 0x8..0x7) and sign-extended
// again on unpacking; every other 4-bit code is stored as is. n must be even; `format` must be a
// 4-bit format and every code valid for it (else nibble::Error).
void pack_4bit(Format format, const uint8_t* codes, int64_t n, uint8_t* packed, const std::string& where);
void unpack_4bit(Format format, const uint8_t* packed, int64_t n, uint8_t* codes, const std::string& where);

// ---- Validation ----------------------------------------------------------------------------------

// Throws nibble::Error(where, "... at row r, column c") for the first NaN or ±inf of a row-major
// [rows, cols] tensor (a group is 1 × n).
void check_finite(const float* x, int64_t rows, int64_t cols, const std::string& where);

// ---- Whole matrices ------------------------------------------------------------------------------

// A row-major [rows, cols] matrix quantized in groups along cols. Unpacked: one code per element.
struct QuantizedMatrix {
  FormatSpec spec;
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes;  // [rows, cols]
  std::vector<float> scales;   // [rows / row_group, cols / group]; empty for the FP8 casts
  std::vector<uint8_t> zeros;  // same shape as scales; asymmetric formats only
  float tensor_scale = 1;      // Nvfp4: nvfp4_tensor_scale(absmax of the whole matrix)

  int64_t group_size() const;  // spec.group, or cols for "whole row" (0) and the FP8 casts
  GroupScale group_scale(int64_t row, int64_t col) const;  // the scale element (row, col) uses
};

// Quantizes x (checked finite; cols % group and rows % row_group must be 0: nibble::Error otherwise).
QuantizedMatrix quantize_rows(const float* x, int64_t rows, int64_t cols, const FormatSpec& spec,
                              const std::string& where);
// out: [rows, cols].
void dequantize_rows(const QuantizedMatrix& q, float* out);
// The row-major index of the first value of q that dequantizes to NaN or ±inf (finite scales can
// still overflow: an E8M0 scale of 2^127 times a code of 6), or -1; holds one row block at a time.
int64_t first_non_finite_dequantized(const QuantizedMatrix& q);
// The simulated path: x := dequantize(quantize(x)) in place, bit for bit equal to the two calls.
void fake_quantize_rows(float* x, int64_t rows, int64_t cols, const FormatSpec& spec, const std::string& where);

}  // namespace nibble::quant
