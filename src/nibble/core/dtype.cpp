#include "nibble/core/dtype.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "nibble/core/error.h"
#include "nibble/core/half.h"

namespace nibble {

namespace {
struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8},     {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},   {DType::I64, "I64", 8},         {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},     {DType::I8, "I8", 1},           {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},   {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};
const DTypeInfo& info(DType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d;
  throw Error("dtype", "unknown dtype enum value");
}
}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
std::string_view dtype_name(DType t) { return info(t).name; }

bool dtype_from_name(std::string_view name, DType* out) {
  for (const auto& d : kDTypes)
    if (d.name == name) {
      *out = d.type;
      return true;
    }
  return false;
}

bool dtype_is_float(DType t) {
  return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16;
}

// Values from which conversions and checks run on several threads (checkpoints hold billions).
constexpr size_t kParallelValues = size_t(1) << 20;

void convert_to_f32(const void* src, DType t, size_t n, float* dst) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F64: {
      const double* s = static_cast<const double*>(src);
#pragma omp parallel for if (n >= kParallelValues)
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp parallel for if (n >= kParallelValues)
      for (size_t i = 0; i < n; ++i) dst[i] = fp16_to_float(s[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp parallel for if (n >= kParallelValues)
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
    default:
      throw Error("convert_to_f32", fmt::format("dtype {} is not a floating-point type", dtype_name(t)));
  }
}

int64_t find_non_finite(const float* x, int64_t n) {
  constexpr int64_t kBlock = 4096;
  int64_t first = n;
#pragma omp parallel for reduction(min : first) if (n >= int64_t(kParallelValues))
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    uint32_t hit = 0;  // exponent all ones: inf or NaN
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, x + i, 4);
      hit |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
    }
    for (int64_t i = begin; hit && i < end; ++i)
      if (!std::isfinite(x[i])) {
        first = std::min(first, i);
        break;
      }
  }
  return first < n ? first : -1;
}

}  // namespace nibble
