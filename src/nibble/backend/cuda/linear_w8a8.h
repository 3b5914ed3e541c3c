// W8A8 linears on the GPU (recipe `w8a8`, the INT8 baseline Atom compares against): INT8 weights
// with one scale per output channel, activations quantized per token at run time (quant/format.h's
// Int8Sym over the whole row), the product by cuBLASLt's INT8 tensor-core GEMM (s8·s8 → s32,
// exact), then y = fp16(acc · row scale · channel scale + bias).
//
// cuBLASLt runs INT8 only in the "TN" form with m and k multiples of 4 (cublasLtMatmul's IMMA
// requirements); here m = out features and k = in features, so both must be multiples of 4, while
// the row count is free (fewer than 32 rows run as 32). A linear that breaks this is refused at
// load, naming its shape.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <cublasLt.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "nibble/backend/cuda/device_array.h"

namespace nibble::quant {
class QuantLinear;
}

namespace nibble::cuda {

// One linear's weights on the device.
struct W8A8Weights {
  std::string name;
  int64_t in = 0, out = 0;
  float act_clip = 1.0f;       // the per-token activation quantizer's clip ratio
  DeviceArray<int8_t> codes;   // [out, in] Int8Sym codes, input channels in permuted order
  DeviceArray<float> scales;   // [out] the weight scale of each output channel
  DeviceArray<__half> bias;    // [out] or empty
  DeviceArray<int32_t> perm;   // [in] input channel of each permuted channel, or empty (identity)
};

// Whether `q` has INT8 weights: such a linear runs here or is refused by upload_w8a8.
bool is_w8a8(const quant::QuantLinear& q);
// q on the device. nibble::Error naming `name` and the option for what has no kernel (weight scales
// per group, keeper channels, group Hadamard, activations not per-token INT8) or a shape cuBLASLt
// cannot take.
W8A8Weights upload_w8a8(const quant::QuantLinear& q, const std::string& name);
// The bytes upload_w8a8 puts on the device for q.
int64_t w8a8_device_bytes(const quant::QuantLinear& q);

// The activation quantizer alone: for each of `rows` fp16 rows of width K (x 8-byte aligned,
// K % 4 == 0), scales[r] = format.h's Int8Sym scale of the row (clip · absmax / 127, rounded by the
// fp16 scale rules) and codes[r, c] = int_sym_encode(x[r, perm[c]], scales[r], 8); perm may be null.
void quantize_rows_int8(const __half* x, int64_t rows, int64_t K, const int32_t* perm, float clip, int8_t* codes,
                        float* scales, cudaStream_t stream);

// The epilogue: y[r, n] = fp16(acc[r, n] · row_scales[r] · col_scales[n] (+ bias[n])), N % 4 == 0,
// acc/col_scales 16-byte and y 8-byte aligned; bias may be null.
void w8a8_rescale(const int32_t* acc, const float* row_scales, const float* col_scales, const __half* bias,
                  int64_t rows, int64_t N, __half* y, cudaStream_t stream);

// Runs W8A8 linears: one cuBLASLt handle and workspace, and scratch (activation codes and scales,
// the int32 product) for up to `max_rows` rows. prepare() sizes the scratch for a linear and picks
// the GEMM algorithm for its shape once per power-of-two row bucket; run() then neither allocates
// nor synchronizes, so a step that calls it can be captured in a CUDA graph.
class W8A8Gemm {
 public:
  explicit W8A8Gemm(int64_t max_rows);
  ~W8A8Gemm();
  W8A8Gemm(const W8A8Gemm&) = delete;
  W8A8Gemm& operator=(const W8A8Gemm&) = delete;

  // At load, for every linear run() will see; nibble::Error naming w.name when cuBLASLt has no
  // INT8 algorithm for its shape.
  void prepare(const W8A8Weights& w);
  // y [rows, w.out] = linear(x [rows, w.in]), fp16 in and out (both 8-byte aligned), asynchronous on
  // `stream`; 1 <= rows <= max_rows.
  void run(const W8A8Weights& w, const __half* x, int64_t rows, __half* y, cudaStream_t stream);

 private:
  int64_t max_rows_;
  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDescOpaque_t desc_{};
  DeviceArray<uint8_t> workspace_;
  DeviceArray<int8_t> act_codes_;  // [max(max_rows, 32), largest in]
  DeviceArray<float> act_scales_;  // [max_rows]
  DeviceArray<int32_t> acc_;       // [max(max_rows, 32), largest out]
  // Per (out, in): the algorithm of each row bucket (rows <= 1, 2, 4, ..., max_rows).
  std::map<std::pair<int64_t, int64_t>, std::vector<cublasLtMatmulAlgo_t>> algos_;
};

}  // namespace nibble::cuda
