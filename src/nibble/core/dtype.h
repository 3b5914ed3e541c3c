// Element types of stored tensors (safetensors names), their sizes and conversion to fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace nibble {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);  // the safetensors spelling: "F32", "BF16", ...
bool dtype_from_name(std::string_view name, DType* out);
bool dtype_is_float(DType t);

// Converts n elements of a floating-point dtype (F64/F32/F16/BF16) to fp32.
void convert_to_f32(const void* src, DType t, size_t n, float* dst);

// Index of the first NaN or ±inf among x[0, n), or -1. Scans blocks branch-free (vectorized), so
// checking every weight at load costs a small fraction of reading it.
int64_t find_non_finite(const float* x, int64_t n);

}  // namespace nibble
