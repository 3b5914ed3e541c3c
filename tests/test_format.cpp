// Number formats (quant/format.h) against float64 reference loops written here from the format
// definitions (not from format.h's code), plus round trips, edge cases and packing.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/quant/format.h"

namespace nibble::quant {
namespace {

// The element functions are constexpr: usable at compile time (and from CUDA device code).
static_assert(fp8_e4m3_encode(448.0f) == 0x7e && fp8_e4m3_decode(0x7e) == 448.0f);
static_assert(e2m1_encode(-6.5f) == 0xf && int_sym_encode(-100.0f, 1.0f, 4) == uint8_t(-8));

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kFloatEps = 0x1p-24;  // unit roundoff of float32

// ---- Float64 definitions of the element types ----------------------------------------------------

double ref_e2m1(int code) {
  static const double magnitudes[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (code & 8 ? -1 : 1) * magnitudes[code & 7];
}

double ref_e4m3(int code) {  // OCP "fn": bias 7, subnormals, 0x7f/0xff NaN, no inf
  const int sign = code & 0x80 ? -1 : 1, e = (code >> 3) & 15, m = code & 7;
  if ((code & 0x7f) == 0x7f) return std::nan("");
  if (e == 0) return sign * std::ldexp(m / 8.0, -6);
  return sign * std::ldexp(1 + m / 8.0, e - 7);
}

double ref_e5m2(int code) {  // IEEE-like: bias 15, subnormals, exponent 31 = inf/NaN
  const int sign = code & 0x80 ? -1 : 1, e = (code >> 2) & 31, m = code & 3;
  if (e == 31) return m ? std::nan("") : sign * kInf;
  if (e == 0) return sign * std::ldexp(m / 4.0, -14);
  return sign * std::ldexp(1 + m / 4.0, e - 15);
}

// Ascending non-negative finite values of a minifloat; the index is the magnitude code.
std::vector<double> magnitude_grid(double (*decode)(int), int count) {
  std::vector<double> grid;
  for (int c = 0; c < count; ++c) grid.push_back(decode(c));
  return grid;
}
const std::vector<double> kE2M1Grid = magnitude_grid(ref_e2m1, 8);
const std::vector<double> kE4M3Grid = magnitude_grid(ref_e4m3, 0x7f);
const std::vector<double> kE5M2Grid = magnitude_grid(ref_e5m2, 0x7c);

// Nearest grid point to v >= 0, ties to the even index, saturating at the ends. near_tie: the two
// nearest points are within `tol` of equidistant, so float32 rounding upstream may pick either.
struct Nearest {
  int index;
  bool near_tie;
};
Nearest nearest(const std::vector<double>& grid, double v, double tol) {
  const auto it = std::lower_bound(grid.begin(), grid.end(), v);
  if (it == grid.begin()) return {0, false};
  if (it == grid.end()) return {int(grid.size()) - 1, false};
  const int hi = int(it - grid.begin()), lo = hi - 1;
  const double to_lo = v - grid[lo], to_hi = grid[hi] - v;
  const int index = to_lo < to_hi ? lo : to_hi < to_lo ? hi : (lo % 2 == 0 ? lo : hi);
  return {index, std::fabs(to_lo - to_hi) <= tol};
}

// Sign-magnitude minifloat code of x, width = bits of the magnitude.
uint8_t minifloat_code(const std::vector<double>& grid, int width, double x, double tol, bool* near_tie) {
  const Nearest n = nearest(grid, std::fabs(x), tol);
  *near_tie = n.near_tie;
  return uint8_t((std::signbit(x) ? 1 << width : 0) | n.index);
}

// Rounds to the nearest integer, ties to even; near_tie as above.
double round_even(double v, double tol, bool* near_tie) {
  *near_tie = std::fabs(std::fabs(v - std::floor(v)) - 0.5) <= tol;
  return std::nearbyint(v);  // float64, default rounding mode: ties to even
}

// The fp16 storage value of a scale: RNE to fp16, with the shared scale rules (0 stays 0, a nonzero
// scale is at least 2^-24, at most 65504). near_tie: float32 arithmetic upstream may round the
// other way.
double ref_fp16_scale(double raw, bool* near_tie) {
  *near_tie = false;
  if (raw == 0) return 0;
  const int exponent = std::max(std::ilogb(raw), -14);  // fp16 normals have exponents -14..15
  const double quantum = std::ldexp(1.0, exponent - 10);
  const double rounded = round_even(raw / quantum, 1e-3, near_tie) * quantum;
  if (rounded == 0) return 0x1p-24;
  return std::min(rounded, 65504.0);
}

// ---- Float64 reference quantizer for one block (row_group rows × group columns) -------------------

struct RefBlock {
  double scale = 0, step = 0;  // stored scale; step = scale × tensor scale (NVFP4) or scale
  int zero = 0;
  bool scale_near_tie = false;
  std::vector<uint8_t> codes;
  std::vector<char> near_tie;
};

RefBlock ref_quantize(const FormatSpec& spec, const std::vector<double>& x, double tensor_scale) {
  double lo = 0, hi = 0, absmax = 0;
  for (double v : x) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    absmax = std::max(absmax, std::fabs(v));
  }
  const double clip = spec.clip;
  RefBlock r;
  r.codes.resize(x.size());
  r.near_tie.assign(x.size(), 0);
  // How far from a tie x / step must be for float32 arithmetic to round it like float64 does: when
  // the quotient (and step) are float32-exact, not at all (-1: even exact ties must match).
  const auto tol = [&r](double v) {
    return float(v) == v && float(r.step) == r.step ? -1 : 8 * kFloatEps * std::fabs(v);
  };
  bool tie = false;
  switch (spec.format) {
    case Format::Int4Sym:
    case Format::Int8Sym: {
      const int qmax = spec.format == Format::Int4Sym ? 7 : 127;
      r.step = r.scale = ref_fp16_scale(clip * absmax / qmax, &r.scale_near_tie);
      for (size_t i = 0; i < x.size(); ++i) {
        const double v = r.step == 0 ? 0 : x[i] / r.step;
        const double q = std::clamp(round_even(v, tol(v), &tie), double(-qmax - 1), double(qmax));
        r.codes[i] = uint8_t(int8_t(q));
        r.near_tie[i] = tie;
      }
      break;
    }
    case Format::Int4SymAtomGptq: {
      // Atom's gptq.py: xmax = absmax, xmin = -xmax, scale = (xmax - xmin)·clip / maxq, zero = 8,
      // q = clamp(round(x / scale) + zero, 0, maxq), value (q - zero)·scale. Our code is q - 8.
      r.step = r.scale = ref_fp16_scale((absmax - -absmax) * clip / 15, &r.scale_near_tie);
      for (size_t i = 0; i < x.size(); ++i) {
        const double v = r.step == 0 ? 0 : x[i] / r.step;
        const double q = std::clamp(round_even(v, tol(v), &tie) + 8, 0.0, 15.0);
        r.codes[i] = uint8_t(int8_t(q - 8));
        r.near_tie[i] = tie;
      }
      break;
    }
    case Format::Int4Asym:
    case Format::Int8Asym: {
      const int qmax = spec.format == Format::Int4Asym ? 15 : 255;
      r.step = r.scale = ref_fp16_scale((clip * hi - clip * lo) / qmax, &r.scale_near_tie);
      if (r.scale != 0) {
        const double z = -clip * lo / r.scale;
        r.zero = int(std::min(round_even(z, tol(z), &tie), double(qmax)));
        r.scale_near_tie |= tie;
      }
      for (size_t i = 0; i < x.size(); ++i) {
        const double v = r.step == 0 ? 0 : x[i] / r.step;
        r.codes[i] = uint8_t(std::clamp(round_even(v, tol(v), &tie) + r.zero, 0.0, double(qmax)));
        r.near_tie[i] = tie;
      }
      break;
    }
    case Format::Fp4E2M1:
    case Format::Mxfp4:
    case Format::Nvfp4: {
      if (spec.format == Format::Fp4E2M1) {
        r.step = r.scale = ref_fp16_scale(clip * absmax / 6, &r.scale_near_tie);
      } else if (spec.format == Format::Mxfp4) {
        const int e = absmax == 0 ? -127 : std::max(std::ilogb(absmax) - 2, -127);
        r.step = r.scale = std::ldexp(1.0, e);
      } else {
        // The definition's float32 operations, in its order: e4m3((absmax / 6) / tensor_scale), and
        // step = scale · tensor_scale.
        if (absmax > 0 && tensor_scale > 0) {
          const float raw = float(absmax) / 6 / float(tensor_scale);
          const Nearest n = nearest(kE4M3Grid, raw, -1);
          r.scale = n.index == 0 ? 0x1p-9 : kE4M3Grid[n.index];
        }
        r.step = float(r.scale) * float(tensor_scale);
      }
      for (size_t i = 0; i < x.size(); ++i) {
        bool near = false;
        r.codes[i] = r.step == 0 ? 0 : minifloat_code(kE2M1Grid, 3, x[i] / r.step, tol(x[i] / r.step), &near);
        r.near_tie[i] = near;
      }
      break;
    }
    case Format::Fp8E4M3:
    case Format::Fp8E5M2: {
      r.step = r.scale = 1;
      const auto& grid = spec.format == Format::Fp8E4M3 ? kE4M3Grid : kE5M2Grid;
      for (size_t i = 0; i < x.size(); ++i) {
        bool near = false;
        r.codes[i] = minifloat_code(grid, 7, x[i], 0, &near);  // exact input: no float32 step
        r.near_tie[i] = near;
      }
      break;
    }
  }
  return r;
}

// Value of a code in float64 (INT codes as integers, minifloat codes as their value).
double ref_code_value(Format f, uint8_t code, int zero) {
  switch (f) {
    case Format::Int4Sym: case Format::Int4SymAtomGptq: case Format::Int8Sym: return int8_t(code);
    case Format::Int4Asym: case Format::Int8Asym: return int(code) - zero;
    case Format::Fp8E4M3: return ref_e4m3(code);
    case Format::Fp8E5M2: return ref_e5m2(code);
    default: return ref_e2m1(code);
  }
}

// Largest |value| of the element grid (in units of step), and the spacing around v.
double grid_max(Format f) {
  switch (f) {
    case Format::Int4Sym: case Format::Int4SymAtomGptq: return 7;
    case Format::Int8Sym: return 127;
    case Format::Fp8E4M3: return 448;
    case Format::Fp8E5M2: return 57344;
    default: return 6;
  }
}
double grid_spacing(Format f, double v) {
  const double a = std::fabs(v);
  switch (f) {
    case Format::Fp8E4M3: return std::ldexp(1.0, std::max(std::ilogb(a), -6) - 3);
    case Format::Fp8E5M2: return std::ldexp(1.0, std::max(std::ilogb(a), -14) - 2);
    case Format::Fp4E2M1: case Format::Mxfp4: case Format::Nvfp4: return a < 2 ? 0.5 : a < 4 ? 1 : 2;
    default: return 1;
  }
}

// ---- Test data -----------------------------------------------------------------------------------

enum class Dist { Normal, HeavyTailed, Tiny, Denormal, Large, Outliers, OneSigned, Quarters };
constexpr Dist kDists[] = {Dist::Normal,   Dist::HeavyTailed, Dist::Tiny,      Dist::Denormal,
                           Dist::Large,    Dist::Outliers,    Dist::OneSigned, Dist::Quarters};

std::vector<float> make_data(Dist dist, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0, 1);
  std::student_t_distribution<double> student(2);
  std::uniform_real_distribution<double> uniform(0, 1);
  std::vector<float> x(n);
  for (auto& v : x) {
    switch (dist) {
      case Dist::Normal: v = float(normal(rng)); break;
      case Dist::HeavyTailed: v = float(student(rng)); break;
      case Dist::Tiny: v = float(normal(rng) * 1e-6); break;       // fp16-subnormal scales
      case Dist::Denormal: v = float(normal(rng) * 1e-39); break;  // float32 denormals
      case Dist::Large: v = float(normal(rng) * 3e4); break;
      case Dist::Outliers: v = float(normal(rng) * (uniform(rng) < 0.01 ? 100 : 1)); break;
      case Dist::OneSigned: v = float(std::fabs(normal(rng)) + 1); break;
      case Dist::Quarters: v = float(std::floor(uniform(rng) * 57) - 28) / 4; break;  // exact ties
    }
  }
  return x;
}

// ---- The reference comparison for one spec ---------------------------------------------------------

struct Tally {
  int64_t elements = 0, blocks = 0, code_near_ties = 0, scale_near_ties = 0;
};

// Quantizes a [rows, cols] matrix of every distribution and checks scales, zeros, codes, decoded
// values and the round-trip error against the float64 reference; the simulated path must equal
// quantize + dequantize bit for bit.
void check_against_reference(const FormatSpec& spec, int64_t rows, int64_t cols, Tally* out = nullptr) {
  Tally local;
  Tally& tally = out ? *out : local;
  uint32_t seed = 1;
  for (Dist dist : kDists) {
    SCOPED_TRACE(testing::Message() << format_name(spec.format) << " group " << spec.group << " row_group "
                                    << spec.row_group << " clip " << spec.clip << " dist " << int(dist));
    const std::vector<float> x = make_data(dist, rows * cols, seed++);
    const QuantizedMatrix q = quantize_rows(x.data(), rows, cols, spec, "test");
    std::vector<float> decoded(x.size());
    dequantize_rows(q, decoded.data());

    std::vector<float> simulated = x;
    fake_quantize_rows(simulated.data(), rows, cols, spec, "test");
    EXPECT_EQ(0, std::memcmp(simulated.data(), decoded.data(), x.size() * sizeof(float)));

    double tensor_scale = 1;
    if (spec.format == Format::Nvfp4) {
      double tensor_absmax = 0;
      for (float v : x) tensor_absmax = std::max(tensor_absmax, std::fabs(double(v)));
      tensor_scale = float(tensor_absmax / (6 * 448));  // stored as fp32
      EXPECT_EQ(q.tensor_scale, tensor_scale);
    }

    const int64_t group = spec.group == 0 || scale_bytes(spec.format) == 0 ? cols : spec.group;
    ASSERT_EQ(q.scales.size(), scale_bytes(spec.format) ? size_t(rows / spec.row_group * (cols / group)) : 0u);
    for (int64_t r0 = 0; r0 < rows; r0 += spec.row_group) {
      for (int64_t c0 = 0; c0 < cols; c0 += group) {
        std::vector<double> block;
        for (int64_t r = r0; r < r0 + spec.row_group; ++r)
          for (int64_t c = c0; c < c0 + group; ++c) block.push_back(x[r * cols + c]);
        const RefBlock ref = ref_quantize(spec, block, tensor_scale);
        const GroupScale got = q.group_scale(r0, c0);
        ++tally.blocks;
        if (ref.scale_near_tie && (got.scale != ref.scale || got.zero != ref.zero)) {
          ++tally.scale_near_ties;  // float32 scale arithmetic rounded the other way: codes differ too
          continue;
        }
        ASSERT_EQ(double(got.scale), ref.scale) << "block at row " << r0 << ", column " << c0;
        ASSERT_EQ(int(got.zero), ref.zero) << "block at row " << r0 << ", column " << c0;
        if (scale_bytes(spec.format) > 0) {
          EXPECT_EQ(scale_from_bits(spec.format, scale_to_bits(spec.format, got.scale)), got.scale);
        }

        for (int64_t r = r0, i = 0; r < r0 + spec.row_group; ++r) {
          for (int64_t c = c0; c < c0 + group; ++c, ++i) {
            const uint8_t code = q.codes[r * cols + c];
            ++tally.elements;
            if (ref.near_tie[i] && code != ref.codes[i]) {
              ++tally.code_near_ties;
              continue;
            }
            ASSERT_EQ(int(code), int(ref.codes[i])) << "x = " << x[r * cols + c] << " at row " << r << ", column " << c;

            // Decoded value: code value × step, rounded once to float32 (exact but for NVFP4).
            const double want = ref_code_value(spec.format, code, ref.zero) * ref.step;
            const double got_value = decoded[r * cols + c];
            ASSERT_EQ(got_value, double(float(want)));

            // Round trip: within the grid's reach the error is at most half a grid step; beyond it
            // the value clamps to the grid's end.
            if (ref.step == 0) {
              EXPECT_EQ(got_value, 0.0);
              continue;
            }
            const double v = x[r * cols + c] / ref.step + (format_is_asymmetric(spec.format) ? ref.zero : 0);
            const double top = format_is_asymmetric(spec.format) ? (1 << format_bits(spec.format)) - 1 : grid_max(spec.format);
            const double bottom = format_is_asymmetric(spec.format) ? 0
                                  : format_signed_codes(spec.format) ? -top - 1 : -top;
            const double err = std::fabs(got_value - x[r * cols + c]);
            if (v >= bottom && v <= top)
              EXPECT_LE(err, 0.5 * grid_spacing(spec.format, v) * ref.step * (1 + 4 * kFloatEps));
            else
              EXPECT_EQ(ref_code_value(spec.format, code, ref.zero), (v > top ? top : bottom) -
                                                                         (format_is_asymmetric(spec.format) ? ref.zero : 0));
          }
        }
      }
    }
  }
  // Near ties are float32-vs-float64 coincidences: they must stay rare.
  EXPECT_LE(tally.code_near_ties, tally.elements / 2000 + 2);
  EXPECT_LE(tally.scale_near_ties, tally.blocks / 200 + 2);
  std::printf("  %-15s group %3d row_group %d clip %.2f: %lld elements, %lld blocks, near ties: %lld codes, %lld scales\n",
              std::string(format_name(spec.format)).c_str(), spec.group, spec.row_group, spec.clip,
              (long long)tally.elements, (long long)tally.blocks, (long long)tally.code_near_ties,
              (long long)tally.scale_near_ties);
}

constexpr int64_t kRows = 8, kCols = 640;  // 640 = 5 · 128: groups 5, 16, 32, 64, 128 and 640 all fit

TEST(Format, IntSymMatchesReference) {
  for (Format f : {Format::Int4Sym, Format::Int8Sym}) {
    check_against_reference({f, 128, 1, 1.0f}, kRows, kCols);
    check_against_reference({f, 128, 1, 0.85f}, kRows, kCols);
    check_against_reference({f, 32, 2, 0.9f}, kRows, kCols);
    check_against_reference({f, 5, 1, 1.0f}, kRows, kCols);
    check_against_reference({f, 0, 4, 1.0f}, kRows, kCols);
  }
}

TEST(Format, AtomGptqGridMatchesAtomsFormula) {
  check_against_reference({Format::Int4SymAtomGptq, 128, 1, 1.0f}, kRows, kCols);
  check_against_reference({Format::Int4SymAtomGptq, 128, 1, 0.85f}, kRows, kCols);
  check_against_reference({Format::Int4SymAtomGptq, 64, 2, 0.9f}, kRows, kCols);

  // Its largest positive value is 7·scale = (14/15)·clip·absmax; the RTN grid's is clip·absmax.
  const std::vector<float> x = make_data(Dist::Normal, 128, 7);
  for (float clip : {1.0f, 0.85f}) {
    GroupStats stats;
    stats.add(x.data(), 128);
    const double target = clip * stats.absmax();
    EXPECT_NEAR(7 * choose_scale({Format::Int4SymAtomGptq, 128, 1, clip}, stats).scale / target, 14.0 / 15, 1e-3);
    EXPECT_NEAR(7 * choose_scale({Format::Int4Sym, 128, 1, clip}, stats).scale / target, 1.0, 1e-3);
  }
}

TEST(Format, IntAsymMatchesReference) {
  for (Format f : {Format::Int4Asym, Format::Int8Asym}) {
    check_against_reference({f, 128, 1, 1.0f}, kRows, kCols);
    check_against_reference({f, 128, 1, 0.95f}, kRows, kCols);
    check_against_reference({f, 64, 4, 1.0f}, kRows, kCols);
    check_against_reference({f, 5, 1, 1.0f}, kRows, kCols);
  }
}

TEST(Format, Fp4E2M1MatchesReference) {
  check_against_reference({Format::Fp4E2M1, 128, 1, 1.0f}, kRows, kCols);
  check_against_reference({Format::Fp4E2M1, 32, 2, 0.9f}, kRows, kCols);
  check_against_reference({Format::Fp4E2M1, 16, 1, 1.0f}, kRows, kCols);
}

TEST(Format, Mxfp4MatchesReference) {
  Tally t;
  check_against_reference({Format::Mxfp4, 32, 1, 1.0f}, kRows, kCols, &t);
  check_against_reference({Format::Mxfp4, 32, 2, 1.0f}, kRows, kCols);
  EXPECT_EQ(t.code_near_ties, 0);  // power-of-two scales: x / scale is exact
}

TEST(Format, Nvfp4MatchesReference) {
  check_against_reference({Format::Nvfp4, 16, 1, 1.0f}, kRows, kCols);
  check_against_reference({Format::Nvfp4, 16, 2, 1.0f}, kRows, kCols);
}

TEST(Format, Fp8CastsMatchReference) {
  for (Format f : {Format::Fp8E4M3, Format::Fp8E5M2}) {
    Tally t;
    check_against_reference({f, 0, 1, 1.0f}, kRows, kCols, &t);
    EXPECT_EQ(t.code_near_ties, 0);
  }
}

// ---- Element types, exhaustively -----------------------------------------------------------------

void expect_same(double want, float got, int code) {
  if (std::isnan(want)) EXPECT_TRUE(std::isnan(got)) << "code " << code;
  else EXPECT_EQ(double(got), want) << "code " << code;
}

// Every finite value encodes to its own code, every midpoint to the even neighbour, and values
// just off a midpoint to the nearer one; beyond the largest value (and ±inf) saturates.
void check_minifloat_encoding(uint8_t (*encode)(float), const std::vector<double>& grid, int width) {
  const uint8_t sign = uint8_t(1 << width);
  const int top = int(grid.size()) - 1;
  for (int c = 0; c <= top; ++c) {
    EXPECT_EQ(encode(float(grid[c])), c);
    EXPECT_EQ(encode(float(-grid[c])), sign | c);
    if (c == top) break;
    const double mid = (grid[c] + grid[c + 1]) / 2;
    EXPECT_EQ(float(mid), mid);  // midpoints are float32-exact for these small types
    EXPECT_EQ(encode(float(mid)), c % 2 == 0 ? c : c + 1) << "midpoint above code " << c;
    EXPECT_EQ(encode(-float(mid)), sign | (c % 2 == 0 ? c : c + 1));
    EXPECT_EQ(encode(std::nextafter(float(mid), 0.0f)), c);
    EXPECT_EQ(encode(std::nextafter(float(mid), INFINITY)), c + 1);
  }
  const double beyond = grid[top] + (grid[top] - grid[top - 1]);  // the next value the type lacks
  EXPECT_EQ(encode(float(beyond)), top);
  EXPECT_EQ(encode(float(beyond * 1e3)), top);
  EXPECT_EQ(encode(INFINITY), top);
  EXPECT_EQ(encode(-INFINITY), sign | top);
  EXPECT_EQ(encode(1e-40f), 0);  // float32 denormal
  EXPECT_EQ(encode(-1e-40f), sign);

  // Random floats over the whole exponent range against the brute-force nearest value.
  std::mt19937 rng(42);
  std::uniform_real_distribution<double> exponent(std::log2(grid[1]) - 4, std::log2(grid[top]) + 2);
  for (int i = 0; i < 20000; ++i) {
    const float x = float(std::exp2(exponent(rng)) * (i % 2 ? -1 : 1));
    bool near = false;
    EXPECT_EQ(encode(x), minifloat_code(grid, width, x, 0, &near)) << "x = " << x;
  }
}

TEST(Format, Fp8E4M3Exhaustive) {
  for (int c = 0; c < 256; ++c) expect_same(ref_e4m3(c), fp8_e4m3_decode(uint8_t(c)), c);
  EXPECT_EQ(kE4M3Grid.back(), 448.0);
  EXPECT_EQ(kE4M3Grid[1], std::ldexp(1.0, -9));
  check_minifloat_encoding(fp8_e4m3_encode, kE4M3Grid, 7);
  EXPECT_EQ(fp8_e4m3_encode(NAN), 0x7f);
}

TEST(Format, Fp8E5M2Exhaustive) {
  for (int c = 0; c < 256; ++c) expect_same(ref_e5m2(c), fp8_e5m2_decode(uint8_t(c)), c);
  EXPECT_EQ(kE5M2Grid.back(), 57344.0);
  EXPECT_EQ(kE5M2Grid[1], std::ldexp(1.0, -16));
  check_minifloat_encoding(fp8_e5m2_encode, kE5M2Grid, 7);
  EXPECT_TRUE(std::isnan(fp8_e5m2_decode(fp8_e5m2_encode(NAN))));
}

TEST(Format, E2M1Exhaustive) {
  for (int c = 0; c < 16; ++c) expect_same(ref_e2m1(c), e2m1_decode(uint8_t(c)), c);
  check_minifloat_encoding(e2m1_encode, kE2M1Grid, 3);
}

TEST(Format, RoundHalfEvenMatchesNearbyint) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-300, 300);
  std::vector<float> values = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 0x1p23f, -0x1p23f, 0x1p23f + 1, 1e30f,
                               0.49999997f, 8388607.5f, -8388607.5f, 0.0f, -0.0f};
  for (int i = 0; i < 100000; ++i) values.push_back(i % 4 ? u(rng) : std::round(u(rng)) + 0.5f);
  for (float v : values) EXPECT_EQ(round_half_even(v), std::nearbyint(v)) << v;
  EXPECT_TRUE(std::isnan(round_half_even(NAN)));
}

// ---- Scales: edge cases --------------------------------------------------------------------------

TEST(Format, MxScaleExponentEdges) {
  const float cases[] = {0.0f,   0x1p-149f, 1e-40f, 0x1p-127f, 0x1p-126f, 0x1p-125f, 0x1p-124f, 1e-38f, 0.75f,
                         1.0f,   1.5f,      3.99f,  4.0f,      5.99f,     6.0f,      7.99f,     8.0f,   1e30f,
                         FLT_MAX};
  for (float absmax : cases) {
    const int want = absmax == 0 ? -127 : std::max(std::ilogb(double(absmax)) - 2, -127);
    EXPECT_EQ(int(mx_scale_code(absmax)), want + 127) << absmax;
    EXPECT_EQ(double(e8m0_decode(mx_scale_code(absmax))), std::ldexp(1.0, want)) << absmax;
  }
  for (int c = 0; c < 255; ++c) EXPECT_EQ(double(e8m0_decode(uint8_t(c))), std::ldexp(1.0, c - 127)) << c;
  EXPECT_TRUE(std::isnan(e8m0_decode(0xff)));

  // absmax in [4, 8)·scale: 7.9 clamps to 6, 4 stays 4; 0.3 is nearer 0.5 than 0.
  const float x[32] = {4.0f, 7.5f, -7.9f, 0.3f, 0.25f};
  uint8_t codes[32];
  const GroupScale g = encode_group({Format::Mxfp4, 32, 1, 1.0f}, x, 32, codes);
  EXPECT_EQ(g.scale, 1.0f);
  const double want[5] = {4, 6, -6, 0.5, 0};  // 0.25 is the tie between 0 and 0.5: even (0)
  for (int i = 0; i < 5; ++i) EXPECT_EQ(ref_e2m1(codes[i]), want[i]) << i;
}

TEST(Format, Nvfp4TwoLevelScale) {
  // Row 0: a block at the tensor's absmax, a block 100× smaller, a block 10^6× smaller (its E4M3
  // scale would round to 0: it gets 2^-9 instead) and an all-zero block.
  std::vector<float> x(64, 0.0f);
  for (int i = 0; i < 16; ++i) {
    x[i] = (i % 2 ? -1 : 1) * 3.0f * float(i + 1);  // absmax 48
    x[16 + i] = x[i] / 100;
    x[32 + i] = x[i] / 1e6f;
  }
  const QuantizedMatrix q = quantize_rows(x.data(), 1, 64, {Format::Nvfp4, 16, 1, 1.0f}, "test");
  EXPECT_EQ(q.tensor_scale, float(48.0 / 2688));
  EXPECT_EQ(scale_to_bits(Format::Nvfp4, q.scales[0]), 0x7e);  // the largest block maps to 448
  const double raw1 = 0.48 / 6 / q.tensor_scale;               // about 4.48: E4M3 step 0.5 there
  EXPECT_NEAR(q.scales[1], raw1, 0.25);
  EXPECT_EQ(q.scales[2], 0x1p-9f);
  EXPECT_EQ(q.scales[3], 0.0f);
  std::vector<float> y(64);
  dequantize_rows(q, y.data());
  for (int b = 0; b < 3; ++b) {  // every nonzero block keeps its relative accuracy
    double absmax = 0, err = 0;
    for (int i = 16 * b; i < 16 * b + 16; ++i) {
      absmax = std::max(absmax, std::fabs(double(x[i])));
      err = std::max(err, std::fabs(double(y[i]) - x[i]));
    }
    EXPECT_LE(err, absmax / 4) << "block " << b;
  }
  for (int i = 48; i < 64; ++i) EXPECT_EQ(y[i], 0.0f);
}

TEST(Format, AllZeroGroupEveryFormat) {
  const Format all[] = {Format::Int4Sym, Format::Int4SymAtomGptq, Format::Int8Sym, Format::Int4Asym, Format::Int8Asym,
                        Format::Fp4E2M1, Format::Mxfp4,          Format::Nvfp4,   Format::Fp8E4M3,  Format::Fp8E5M2};
  for (Format f : all) {
    const FormatSpec spec{f, f == Format::Mxfp4 ? 32 : f == Format::Nvfp4 ? 16 : 32, 1, 1.0f};
    std::vector<float> x(64, 0.0f), y(64, 1.0f);
    const QuantizedMatrix q = quantize_rows(x.data(), 2, 32, spec, "zeros");
    for (uint8_t c : q.codes) EXPECT_EQ(c, 0) << format_name(f);
    for (float s : q.scales) EXPECT_EQ(s, f == Format::Mxfp4 ? 0x1p-127f : 0.0f) << format_name(f);
    for (uint8_t z : q.zeros) EXPECT_EQ(z, 0);
    dequantize_rows(q, y.data());
    for (float v : y) EXPECT_EQ(v, 0.0f) << format_name(f);
    fake_quantize_rows(x.data(), 2, 32, spec, "zeros");
    for (float v : x) EXPECT_EQ(v, 0.0f) << format_name(f);
  }
}

TEST(Format, TinyAndHugeGroupsKeepAUsableScale) {
  // Denormal group: the fp16 scale would round to 0, so it is the smallest fp16 subnormal.
  const float denormal[4] = {1e-40f, -3e-39f, 2e-41f, 0.0f};
  uint8_t codes[4];
  for (Format f : {Format::Int4Sym, Format::Int8Sym, Format::Int4Asym, Format::Fp4E2M1}) {
    const GroupScale g = encode_group({f, 4, 1, 1.0f}, denormal, 4, codes);
    EXPECT_EQ(g.scale, 0x1p-24f) << format_name(f);
  }
  // 1.5e-7 / 7 is below half the smallest fp16 subnormal: scale 2^-24, codes round(x / 2^-24).
  const float tiny[2] = {1.5e-7f, -0.6e-7f};
  GroupScale g = encode_group({Format::Int4Sym, 2, 1, 1.0f}, tiny, 2, codes);
  EXPECT_EQ(g.scale, 0x1p-24f);
  EXPECT_EQ(int8_t(codes[0]), int8_t(std::nearbyint(1.5e-7 / 0x1p-24)));
  EXPECT_EQ(int8_t(codes[1]), int8_t(std::nearbyint(-0.6e-7 / 0x1p-24)));
  // A scale above fp16's range saturates at 65504 and the grid clamps.
  const float huge[2] = {1e30f, -1e30f};
  g = encode_group({Format::Int4Sym, 2, 1, 1.0f}, huge, 2, codes);
  EXPECT_EQ(g.scale, 65504.0f);
  EXPECT_EQ(int8_t(codes[0]), 7);
  EXPECT_EQ(int8_t(codes[1]), -8);
}

TEST(Format, AsymmetricRangeAlwaysContainsZero) {
  // All-positive group: lo = 0, zero = 0, and the top reaches clip·max.
  const float x[4] = {1.0f, 2.0f, 3.0f, 15.0f};
  uint8_t codes[4];
  const GroupScale g = encode_group({Format::Int4Asym, 4, 1, 1.0f}, x, 4, codes);
  EXPECT_EQ(g.scale, 1.0f);
  EXPECT_EQ(g.zero, 0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(decode_element(Format::Int4Asym, codes[i], g), x[i]);
  // Constant negative group: zero = 15, codes 0, exact.
  const float c[2] = {-4.5f, -4.5f};
  const GroupScale gc = encode_group({Format::Int4Asym, 2, 1, 1.0f}, c, 2, codes);
  EXPECT_EQ(gc.zero, 15);
  EXPECT_EQ(decode_element(Format::Int4Asym, codes[0], gc), round_fp16(4.5f / 15) * -15);
}

// ---- Validation ----------------------------------------------------------------------------------

TEST(Format, NonFiniteInputIsRejectedWithItsIndex) {
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> x = make_data(Dist::Normal, 4 * 128, 9);
    x[2 * 128 + 37] = bad;
    EXPECT_EQ(find_non_finite(x.data(), int64_t(x.size())), 2 * 128 + 37);
    for (Format f : {Format::Int4Sym, Format::Int4Asym, Format::Mxfp4, Format::Nvfp4, Format::Fp8E4M3}) {
      const FormatSpec spec{f, f == Format::Nvfp4 ? 16 : 32, 1, 1.0f};
      try {
        quantize_rows(x.data(), 4, 128, spec, "layer0.q_proj");
        ADD_FAILURE() << "no error for " << bad;
      } catch (const Error& e) {
        EXPECT_EQ(e.where(), "layer0.q_proj");
        EXPECT_NE(std::string(e.what()).find("row 2, column 37"), std::string::npos) << e.what();
      }
      EXPECT_THROW(fake_quantize_rows(x.data(), 4, 128, spec, "x"), Error);
    }
    EXPECT_THROW(check_finite(x.data(), 4, 128, "x"), Error);
  }
  const float fine[3] = {1, FLT_MAX, -FLT_MIN / 2};
  EXPECT_EQ(find_non_finite(fine, 3), -1);
  EXPECT_NO_THROW(check_finite(fine, 1, 3, "x"));
}

TEST(Format, SpecAndShapeValidation) {
  std::vector<float> x(4 * 96, 1.0f);
  EXPECT_THROW(quantize_rows(x.data(), 4, 96, {Format::Int4Sym, 128, 1, 1.0f}, "w"), Error);  // 96 % 128
  EXPECT_THROW(quantize_rows(x.data(), 4, 96, {Format::Int4Sym, 32, 3, 1.0f}, "w"), Error);   // 4 % 3
  EXPECT_NO_THROW(quantize_rows(x.data(), 4, 96, {Format::Int4Sym, 32, 2, 1.0f}, "w"));
  EXPECT_NO_THROW(quantize_rows(x.data(), 4, 96, {Format::Fp8E4M3, 128, 1, 1.0f}, "w"));  // casts: no groups
  EXPECT_THROW(validate_spec({Format::Mxfp4, 16, 1, 1.0f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Nvfp4, 32, 1, 1.0f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Int4Sym, 128, 1, 0.0f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Int4Sym, 128, 1, 1.5f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Int4Sym, 128, 1, NAN}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Int4Sym, 128, 0, 1.0f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Int4Sym, -1, 1, 1.0f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Fp8E4M3, 0, 1, 0.9f}, "s"), Error);
  EXPECT_THROW(validate_spec({Format::Mxfp4, 32, 1, 0.9f}, "s"), Error);
  EXPECT_NO_THROW(validate_spec({Format::Int4Asym, 0, 1, 0.5f}, "s"));
  try {
    quantize_rows(x.data(), 4, 96, {Format::Int4Sym, 128, 1, 1.0f}, "model.layers.0.mlp.up_proj");
    ADD_FAILURE() << "a group of 128 over 96 columns must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("96 columns"), std::string::npos) << e.what();
  }
}

TEST(Format, NamesRoundTrip) {
  for (int i = 0; i <= int(Format::Fp8E5M2); ++i) {
    const Format f = Format(i);
    EXPECT_EQ(parse_format(format_name(f), "cli"), f);
  }
  EXPECT_THROW(parse_format("int3", "cli"), Error);
}

// ---- Packing -------------------------------------------------------------------------------------

TEST(Format, PackUnpackEveryByte) {
  std::vector<uint8_t> bytes(256), codes(512), repacked(256);
  for (int b = 0; b < 256; ++b) bytes[b] = uint8_t(b);
  for (Format f : {Format::Int4Sym, Format::Int4SymAtomGptq, Format::Int4Asym, Format::Fp4E2M1, Format::Mxfp4,
                   Format::Nvfp4}) {
    unpack_4bit(f, bytes.data(), 512, codes.data(), "t");
    for (int b = 0; b < 256; ++b) {
      const int low = b & 15, high = b >> 4;  // element 2i low nibble, 2i+1 high nibble
      if (format_signed_codes(f)) {
        EXPECT_EQ(int8_t(codes[2 * b]), low >= 8 ? low - 16 : low);
        EXPECT_EQ(int8_t(codes[2 * b + 1]), high >= 8 ? high - 16 : high);
      } else {
        EXPECT_EQ(codes[2 * b], low);
        EXPECT_EQ(codes[2 * b + 1], high);
      }
    }
    pack_4bit(f, codes.data(), 512, repacked.data(), "t");
    EXPECT_EQ(repacked, bytes) << format_name(f);
  }
  // Encoded codes pack as documented: -3 -> 0xd, 5 -> 0x5 gives 0x5d.
  const uint8_t pair[2] = {uint8_t(int8_t(-3)), 5};
  uint8_t one = 0;
  pack_4bit(Format::Int4Sym, pair, 2, &one, "t");
  EXPECT_EQ(one, 0x5d);
}

TEST(Format, PackRejectsBadInput) {
  uint8_t codes[4] = {1, 2, 3, 4}, packed[2];
  EXPECT_THROW(pack_4bit(Format::Int4Sym, codes, 3, packed, "t"), Error);
  EXPECT_THROW(unpack_4bit(Format::Int4Sym, packed, 3, codes, "t"), Error);
  EXPECT_THROW(pack_4bit(Format::Int8Sym, codes, 4, packed, "t"), Error);
  const uint8_t too_big[2] = {16, 0};
  EXPECT_THROW(pack_4bit(Format::Fp4E2M1, too_big, 2, packed, "t"), Error);
  const uint8_t not_int4[2] = {8, 0};  // +8 is outside -8..7
  EXPECT_THROW(pack_4bit(Format::Int4Sym, not_int4, 2, packed, "t"), Error);
}

// Past the threshold (un)packing runs on several threads: the bytes equal a byte-by-byte packing,
// and of two bad codes the first is the one named.
TEST(Format, PackUnpackOfMillionsOfCodes) {
  const int64_t n = int64_t(3) << 20;
  std::mt19937 rng(7321);
  const size_t half = size_t(n / 2);
  std::vector<uint8_t> bytes(half), codes(2 * half), repacked(half);
  for (auto& b : bytes) b = uint8_t(rng());
  unpack_4bit(Format::Int4Sym, bytes.data(), n, codes.data(), "t");
  for (int64_t j = 0; j < n / 2; ++j) {
    const int low = bytes[size_t(j)] & 15, high = bytes[size_t(j)] >> 4;
    ASSERT_EQ(int8_t(codes[size_t(2 * j)]), low >= 8 ? low - 16 : low) << j;
    ASSERT_EQ(int8_t(codes[size_t(2 * j + 1)]), high >= 8 ? high - 16 : high) << j;
  }
  pack_4bit(Format::Int4Sym, codes.data(), n, repacked.data(), "t");
  EXPECT_EQ(repacked, bytes);
  codes[size_t(n - 5)] = 9;
  codes[size_t(n / 3)] = 200;  // int8 -56
  try {
    pack_4bit(Format::Int4Sym, codes.data(), n, repacked.data(), "t");
    ADD_FAILURE() << "bad codes packed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("code -56 at {} ", n / 3)), std::string::npos) << e.what();
  }
}

// first_non_finite_dequantized decides fp16-scaled formats from their scales alone: it must name
// the same element as dequantizing everything and scanning, for poisoned (inf, NaN), huge and
// ordinary scales, in every format (the others still dequantize).
TEST(Format, FirstNonFiniteDequantizedMatchesAFullScan) {
  const Format all[] = {Format::Int4Sym, Format::Int4SymAtomGptq, Format::Int8Sym, Format::Int4Asym, Format::Int8Asym,
                        Format::Fp4E2M1, Format::Mxfp4,          Format::Nvfp4,   Format::Fp8E4M3,  Format::Fp8E5M2};
  std::mt19937 rng(20261204);
  const int64_t rows = 6, cols = 64;
  for (Format f : all) {
    for (int row_group : {1, 2}) {
      const FormatSpec spec{f, f == Format::Mxfp4 ? 32 : 16, row_group, 1.0f};
      const std::vector<float> x = make_data(Dist::Normal, rows * cols, uint32_t(rng()));
      const QuantizedMatrix clean = quantize_rows(x.data(), rows, cols, spec, "scan");
      const float poisons[] = {INFINITY, -INFINITY, NAN, 1e38f, 3e35f, 2.0f};
      for (int trial = 0; trial < 12; ++trial) {
        QuantizedMatrix q = clean;
        if (!q.scales.empty() && trial > 0) {
          std::uniform_int_distribution<size_t> at(0, q.scales.size() - 1);
          for (int k = 0; k < 1 + trial % 3; ++k) q.scales[at(rng)] = poisons[rng() % std::size(poisons)];
        }
        std::vector<float> y(size_t(rows * cols));
        dequantize_rows(q, y.data());
        int64_t expected = -1;
        for (int64_t i = 0; i < rows * cols && expected < 0; ++i)
          if (!std::isfinite(y[size_t(i)])) expected = i;
        EXPECT_EQ(first_non_finite_dequantized(q), expected) << format_name(f) << " row_group " << row_group
                                                             << " trial " << trial;
      }
    }
  }
}

}  // namespace
}  // namespace nibble::quant
