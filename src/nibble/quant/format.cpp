#include "nibble/quant/format.h"

#include <cmath>
#include <limits>

#include "nibble/core/error.h"

namespace nibble::quant {

namespace {

struct FormatInfo {
  Format format;
  std::string_view name;
};
constexpr FormatInfo kFormats[] = {
    {Format::Int4Sym, "int4"},     {Format::Int4SymAtomGptq, "int4-atom-gptq"},
    {Format::Int8Sym, "int8"},     {Format::Int4Asym, "int4-asym"},
    {Format::Int8Asym, "int8-asym"}, {Format::Fp4E2M1, "fp4"},
    {Format::Mxfp4, "mxfp4"},      {Format::Nvfp4, "nvfp4"},
    {Format::Fp8E4M3, "fp8-e4m3"}, {Format::Fp8E5M2, "fp8-e5m2"},
};

// The group size along cols that the matrix helpers use.
int64_t effective_group(const FormatSpec& spec, int64_t cols) {
  return spec.group == 0 || scale_bytes(spec.format) == 0 ? cols : spec.group;
}

void check_shape(const FormatSpec& spec, int64_t rows, int64_t cols, const std::string& where) {
  validate_spec(spec, where);
  check(rows >= 0 && cols > 0, where, "bad matrix shape [{}, {}]", rows, cols);
  const int64_t group = effective_group(spec, cols);
  check(cols % group == 0, where, "{} columns are not a multiple of the group size {} ({})", cols, group,
        format_name(spec.format));
  check(rows % spec.row_group == 0, where, "{} rows are not a multiple of row_group {}", rows, spec.row_group);
}

float tensor_scale_of(const FormatSpec& spec, const float* x, int64_t n) {
  if (spec.format != Format::Nvfp4) return 1;
  GroupStats stats;
  stats.add(x, n);
  return nvfp4_tensor_scale(stats.absmax());
}

// Runs fn.template operator()<F>() with the format as a compile-time constant, so that the switch
// inside encode_element / decode_element folds away in the per-element loops.
template <typename Fn>
void with_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::Int4Sym: return fn.template operator()<Format::Int4Sym>();
    case Format::Int4SymAtomGptq: return fn.template operator()<Format::Int4SymAtomGptq>();
    case Format::Int8Sym: return fn.template operator()<Format::Int8Sym>();
    case Format::Int4Asym: return fn.template operator()<Format::Int4Asym>();
    case Format::Int8Asym: return fn.template operator()<Format::Int8Asym>();
    case Format::Fp4E2M1: return fn.template operator()<Format::Fp4E2M1>();
    case Format::Mxfp4: return fn.template operator()<Format::Mxfp4>();
    case Format::Nvfp4: return fn.template operator()<Format::Nvfp4>();
    case Format::Fp8E4M3: return fn.template operator()<Format::Fp8E4M3>();
    case Format::Fp8E5M2: return fn.template operator()<Format::Fp8E5M2>();
  }
}

// The scale of group g of the row_group rows starting at x (one scale per row_group × group block).
GroupScale block_scale(const FormatSpec& spec, const float* x, int64_t cols, int64_t c0, int64_t group,
                       float tensor_scale) {
  GroupStats stats;
  for (int r = 0; r < spec.row_group; ++r) stats.add(x + r * cols + c0, group);
  return choose_scale(spec, stats, tensor_scale);
}

// Quantizes the row_group rows starting at x: one scale per group (from the whole
// row_group × group block) into scales[groups], codes into codes[row_group, cols].
void quantize_row_block(const FormatSpec& spec, const float* x, int64_t cols, float tensor_scale,
                        uint8_t* codes, GroupScale* scales) {
  const int64_t group = effective_group(spec, cols);
  with_format(spec.format, [&]<Format F>() {
    for (int64_t c0 = 0, g = 0; c0 < cols; c0 += group, ++g) {
      scales[g] = block_scale(spec, x, cols, c0, group, tensor_scale);
      for (int r = 0; r < spec.row_group; ++r)
        for (int64_t c = c0; c < c0 + group; ++c) codes[r * cols + c] = encode_element(F, x[r * cols + c], scales[g]);
    }
  });
}

void dequantize_row_block(const FormatSpec& spec, const uint8_t* codes, int64_t cols, const GroupScale* scales,
                          float* out) {
  const int64_t group = effective_group(spec, cols);
  with_format(spec.format, [&]<Format F>() {
    for (int r = 0; r < spec.row_group; ++r)
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = decode_element(F, codes[r * cols + c], scales[c / group]);
  });
}

// quantize_row_block then dequantize_row_block in place, without the codes in between.
void fake_quantize_row_block(const FormatSpec& spec, float* x, int64_t cols, float tensor_scale) {
  const int64_t group = effective_group(spec, cols);
  with_format(spec.format, [&]<Format F>() {
    for (int64_t c0 = 0; c0 < cols; c0 += group) {
      const GroupScale g = block_scale(spec, x, cols, c0, group, tensor_scale);
      for (int r = 0; r < spec.row_group; ++r)
        for (int64_t c = c0; c < c0 + group; ++c) {
          float& v = x[r * cols + c];
          v = decode_element(F, encode_element(F, v, g), g);
        }
    }
  });
}

}  // namespace

std::string_view format_name(Format f) {
  for (const auto& info : kFormats)
    if (info.format == f) return info.name;
  return "unknown";
}

Format parse_format(std::string_view name, const std::string& where) {
  std::string known;
  for (const auto& info : kFormats) {
    if (info.name == name) return info.format;
    known += (known.empty() ? "" : ", ") + std::string(info.name);
  }
  throw Error(where, fmt::format("unknown number format '{}' (known: {})", name, known));
}

void validate_spec(const FormatSpec& spec, const std::string& where) {
  const std::string_view name = format_name(spec.format);
  check(name != "unknown", where, "invalid format enum value {}", int(spec.format));
  check(spec.group >= 0, where, "{}: group size {} is negative", name, spec.group);
  check(spec.row_group >= 1, where, "{}: row_group {} must be at least 1", name, spec.row_group);
  if (spec.format == Format::Mxfp4) check(spec.group == 32, where, "mxfp4 needs group 32, not {}", spec.group);
  if (spec.format == Format::Nvfp4) check(spec.group == 16, where, "nvfp4 needs group 16, not {}", spec.group);
  const bool clips = spec.format != Format::Mxfp4 && spec.format != Format::Nvfp4 && scale_bytes(spec.format) > 0;
  if (clips)
    check(spec.clip > 0 && spec.clip <= 1, where, "{}: clip ratio {} is not in (0, 1]", name, spec.clip);
  else
    check(spec.clip == 1, where, "{} takes no clip ratio (got {})", name, spec.clip);
}

// Codes from which (un)packing runs on several threads: a 70B model holds tens of billions.
constexpr int64_t kParallelCodes = int64_t(1) << 20;

void pack_4bit(Format format, const uint8_t* codes, int64_t n, uint8_t* packed, const std::string& where) {
  check(format_bits(format) == 4, where, "{} is not a 4-bit format", format_name(format));
  check(n % 2 == 0, where, "cannot pack an odd number ({}) of 4-bit codes", n);
  // A code is valid when it has no bits above its nibble: unsigned 0..15 as it is, signed -8..7
  // after adding 8 (mod 256). One pass packs and collects the stray bits (a 70B upload packs 65 G codes).
  const uint8_t bias = format_signed_codes(format) ? 8 : 0;
  uint8_t stray = 0;
#pragma omp parallel for reduction(| : stray) if (n >= kParallelCodes)
  for (int64_t j = 0; j < n / 2; ++j) {
    const uint8_t a = codes[2 * j], b = codes[2 * j + 1];
    stray |= uint8_t(uint8_t(a + bias) | uint8_t(b + bias)) & 0xf0;
    packed[j] = uint8_t((a & 0xf) | (b & 0xf) << 4);
  }
  if (stray == 0) return;
  const bool is_signed = format_signed_codes(format);
  for (int64_t i = 0; i < n; ++i) {
    const int v = is_signed ? int(int8_t(codes[i])) : int(codes[i]);
    check(is_signed ? v >= -8 && v <= 7 : v <= 15, where, "code {} at {} is not a 4-bit {} code", v, i,
          format_name(format));
  }
}

void unpack_4bit(Format format, const uint8_t* packed, int64_t n, uint8_t* codes, const std::string& where) {
  check(format_bits(format) == 4, where, "{} is not a 4-bit format", format_name(format));
  check(n % 2 == 0, where, "cannot unpack an odd number ({}) of 4-bit codes", n);
  // Sign extension: flipping bit 3 then subtracting 8 maps nibbles 0x8..0xf to -8..-1 (bias 0:
  // unsigned codes stay as they are).
  const uint8_t bias = format_signed_codes(format) ? 8 : 0;
#pragma omp parallel for if (n >= kParallelCodes)
  for (int64_t j = 0; j < n / 2; ++j) {
    codes[2 * j] = uint8_t(((packed[j] & 0xf) ^ bias) - bias);
    codes[2 * j + 1] = uint8_t(((packed[j] >> 4) ^ bias) - bias);
  }
}

void check_finite(const float* x, int64_t rows, int64_t cols, const std::string& where) {
  const int64_t i = find_non_finite(x, rows * cols);
  if (i < 0) return;
  throw Error(where, fmt::format("cannot quantize {} at row {}, column {}",
                                 std::isnan(x[i]) ? "NaN" : x[i] > 0 ? "+inf" : "-inf", i / cols, i % cols));
}

int64_t QuantizedMatrix::group_size() const { return effective_group(spec, cols); }

GroupScale QuantizedMatrix::group_scale(int64_t row, int64_t col) const {
  if (scales.empty()) return {1};  // FP8 casts
  const int64_t index = (row / spec.row_group) * (cols / group_size()) + col / group_size();
  return {scales[index], tensor_scale, zeros.empty() ? uint8_t(0) : zeros[index]};
}

QuantizedMatrix quantize_rows(const float* x, int64_t rows, int64_t cols, const FormatSpec& spec,
                              const std::string& where) {
  check_shape(spec, rows, cols, where);
  check_finite(x, rows, cols, where);
  QuantizedMatrix q;
  q.spec = spec;
  q.rows = rows;
  q.cols = cols;
  q.tensor_scale = tensor_scale_of(spec, x, rows * cols);
  q.codes.resize(rows * cols);
  const int64_t groups = cols / q.group_size(), blocks = rows / spec.row_group;
  const bool has_scales = scale_bytes(spec.format) > 0, has_zeros = format_is_asymmetric(spec.format);
  if (has_scales) q.scales.resize(blocks * groups);
  if (has_zeros) q.zeros.resize(blocks * groups);
#pragma omp parallel if (blocks > 1)
  {
    std::vector<GroupScale> scales(groups);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t offset = b * spec.row_group * cols;
      quantize_row_block(spec, x + offset, cols, q.tensor_scale, q.codes.data() + offset, scales.data());
      for (int64_t g = 0; g < groups; ++g) {
        if (has_scales) q.scales[b * groups + g] = scales[g].scale;
        if (has_zeros) q.zeros[b * groups + g] = scales[g].zero;
      }
    }
  }
  return q;
}

namespace {

// Dequantizes row block b of q into out ([row_group, cols]); scales: the caller's buffer, one per group.
void dequantize_block(const QuantizedMatrix& q, int64_t b, std::vector<GroupScale>& scales, float* out) {
  for (size_t g = 0; g < scales.size(); ++g) scales[g] = q.group_scale(b * q.spec.row_group, int64_t(g) * q.group_size());
  dequantize_row_block(q.spec, q.codes.data() + b * q.spec.row_group * q.cols, q.cols, scales.data(), out);
}

}  // namespace

void dequantize_rows(const QuantizedMatrix& q, float* out) {
  const int64_t groups = q.cols / q.group_size(), blocks = q.rows / q.spec.row_group;
#pragma omp parallel if (blocks > 1)
  {
    std::vector<GroupScale> scales(static_cast<size_t>(groups));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) dequantize_block(q, b, scales, out + b * q.spec.row_group * q.cols);
  }
}

int64_t first_non_finite_dequantized(const QuantizedMatrix& q) {
  const int64_t groups = q.cols / q.group_size(), blocks = q.rows / q.spec.row_group;
  if (scale_bytes(q.spec.format) == 2) {
    // An fp16-scaled format decodes to a scale times at most 255 in magnitude (an INT code, code -
    // zero, or an E2M1 value), so when every scale is finite and below FLT_MAX / 1024 every value is
    // finite (a damaged file falls through to the scan, which names the first bad element).
    // Dequantizing each value was two thirds of a packed load.
    float largest = 0;
    for (float s : q.scales) largest = std::max(largest, std::isfinite(s) ? std::abs(s) : INFINITY);
    if (largest < std::numeric_limits<float>::max() / 1024) return -1;
  }
  const int64_t block_values = q.spec.row_group * q.cols;
  int64_t first = -1;
#pragma omp parallel if (blocks > 1)
  {
    std::vector<GroupScale> scales(static_cast<size_t>(groups));
    std::vector<float> values(static_cast<size_t>(block_values));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      dequantize_block(q, b, scales, values.data());
      for (int64_t i = 0; i < block_values; ++i) {
        if (std::isfinite(values[size_t(i)])) continue;
#pragma omp critical(nibble_first_non_finite)
        if (first < 0 || b * block_values + i < first) first = b * block_values + i;
        break;
      }
    }
  }
  return first;
}

void fake_quantize_rows(float* x, int64_t rows, int64_t cols, const FormatSpec& spec, const std::string& where) {
  check_shape(spec, rows, cols, where);
  check_finite(x, rows, cols, where);
  const float tensor_scale = tensor_scale_of(spec, x, rows * cols);
  const int64_t blocks = rows / spec.row_group;
  // One-row calls (a token's activations) stay on the caller's thread.
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) fake_quantize_row_block(spec, x + b * spec.row_group * cols, cols, tensor_scale);
}

}  // namespace nibble::quant
