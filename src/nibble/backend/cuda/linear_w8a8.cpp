#include "nibble/backend/cuda/linear_w8a8.h"

#include <algorithm>
#include <bit>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/quant/quant_linear.h"

namespace nibble::cuda {

namespace {

// What NVIDIA advises for Hopper; the split-K kernels the heuristic may pick use it.
constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr int kCandidates = 8;  // heuristic answers tried per row bucket

// The three operands of Cᵀ[out, rows] = W[out, in] · Xᵀ in cuBLASLt's column-major terms: W is
// [in, out] with ld in (transposed by the operation), X [in, rows], C [out, rows].
struct Layouts {
  cublasLtMatrixLayoutOpaque_t w, x, c;
  Layouts(int64_t out, int64_t in, int64_t rows) {
    NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutInit(&w, CUDA_R_8I, uint64_t(in), uint64_t(out), in));
    NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutInit(&x, CUDA_R_8I, uint64_t(in), uint64_t(rows), in));
    NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutInit(&c, CUDA_R_32I, uint64_t(out), uint64_t(rows), out));
  }
};

// Row bucket of `rows`: rows <= 1 → 0, else ceil(log2(rows)).
int bucket_of(int64_t rows) { return int(std::bit_width(uint64_t(rows - 1))); }

// The GEMM runs on at least 32 rows: cuBLASLt's INT8 path has refused small row counts (PyTorch's
// _int_mm demands more than 16 and now pads 1..31 to 32). The rows past `rows` hold whatever the
// scratch held (zero at first): their products land in rows of the int32 result nobody reads.
constexpr int64_t kMinGemmRows = 32;
int64_t gemm_rows(int64_t rows) { return std::max(rows, kMinGemmRows); }

}  // namespace

bool is_w8a8(const quant::QuantLinear& q) { return q.spec().weight.format == quant::Format::Int8Sym; }

W8A8Weights upload_w8a8(const quant::QuantLinear& q, const std::string& name) {
  using quant::Format;
  const quant::LinearQuantSpec& s = q.spec();
  const int64_t N = q.out_features(), K = q.in_features();
  require(s.keeper == 0, name, "the GPU runs W8A8 without keeper channels (this linear keeps {}); use --device cpu",
          s.keeper);
  require(!s.group_hadamard, name,
          "the GPU runs W8A8 without the group Hadamard rotation (this linear has it); use --device cpu");
  require(s.act && s.act->format == Format::Int8Sym && (s.act->group == 0 || s.act->group == K), name,
          "the GPU runs INT8 weights with per-token INT8 activations only (this linear: {}); use --device cpu",
          s.act ? cformat("{} activations in groups of {}", quant::format_name(s.act->format), s.act->group)
                : std::string("full-precision activations"));
  const quant::QuantizedMatrix& m = q.main();
  require(s.quantize_weights && m.rows == N && m.cols == K && m.group_size() == K, name,
          "the GPU runs INT8 weights with one scale per output channel only (this linear: groups of {}); use "
          "--device cpu",
          s.weight.group);
  require(N % 4 == 0 && K % 4 == 0, name,
          "cuBLASLt's INT8 GEMM needs in and out features that are multiples of 4; this linear is {} x {} (out x "
          "in): use --device cpu",
          N, K);
  std::vector<float> scales(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) scales[size_t(n)] = m.group_scale(n, 0).scale;  // row groups spelled out
  W8A8Weights w;
  w.name = name;
  w.in = K;
  w.out = N;
  w.act_clip = s.act->clip;
  w.codes = DeviceArray<int8_t>(reinterpret_cast<const int8_t*>(m.codes.data()), m.codes.size());
  w.scales = DeviceArray<float>(scales.data(), scales.size());
  w.bias = upload_fp16(q.bias(), name + ".bias");
  if (!q.perm().empty()) w.perm = DeviceArray<int32_t>(q.perm().data(), q.perm().size());
  return w;
}

int64_t w8a8_device_bytes(const quant::QuantLinear& q) {
  const int64_t N = q.out_features(), K = q.in_features();
  return N * K + N * int64_t(sizeof(float)) + int64_t(q.bias().size()) * 2 + int64_t(q.perm().size()) * 4;
}

W8A8Gemm::W8A8Gemm(int64_t max_rows) : max_rows_(max_rows), workspace_(kWorkspaceBytes) {
  require(max_rows >= 1, "W8A8Gemm", "max_rows must be >= 1, not {}", max_rows);
  NIBBLE_CUBLAS_CHECK(cublasLtCreate(&handle_));
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescInit(&desc_, CUBLAS_COMPUTE_32I, CUDA_R_32I));
  const cublasOperation_t transpose = CUBLAS_OP_T;
  NIBBLE_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(&desc_, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  act_scales_ = DeviceArray<float>(size_t(max_rows));
}

W8A8Gemm::~W8A8Gemm() {
  if (handle_) cublasLtDestroy(handle_);
}

void W8A8Gemm::prepare(const W8A8Weights& w) {
  const int64_t rows = gemm_rows(max_rows_);
  if (act_codes_.size() < size_t(rows * w.in)) {
    act_codes_ = DeviceArray<int8_t>(size_t(rows * w.in));
    NIBBLE_CUDA_CHECK(cudaMemset(act_codes_.get(), 0, act_codes_.size()));
  }
  if (acc_.size() < size_t(rows * w.out)) acc_ = DeviceArray<int32_t>(size_t(rows * w.out));
  const auto key = std::make_pair(w.out, w.in);
  if (algos_.count(key)) return;
  cublasLtMatmulPreferenceOpaque_t pref;
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceInit(&pref));
  const uint64_t ws = workspace_.size();
  NIBBLE_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(&pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  std::vector<cublasLtMatmulAlgo_t> buckets;
  // Bucket i holds rows (2^(i-1), 2^i] (the last one ends at max_rows_): the algorithm the heuristic
  // ranks best for the bucket's largest row count that also passes cuBLASLt's check at its smallest.
  for (int64_t lo = 1, hi = 1; lo <= max_rows_; lo = hi + 1, hi = std::min(2 * hi, max_rows_)) {
    Layouts large(w.out, w.in, gemm_rows(hi)), small(w.out, w.in, gemm_rows(lo));
    cublasLtMatmulHeuristicResult_t found[kCandidates] = {};
    int count = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, &desc_, &large.w, &large.x, &large.c, &large.c,
                                                             &pref, kCandidates, found, &count);
    const cublasLtMatmulHeuristicResult_t* pick = nullptr;
    for (int i = 0; st == CUBLAS_STATUS_SUCCESS && i < count && !pick; ++i) {
      cublasLtMatmulHeuristicResult_t check{};
      if (found[i].state == CUBLAS_STATUS_SUCCESS && found[i].workspaceSize <= ws &&
          cublasLtMatmulAlgoCheck(handle_, &desc_, &small.w, &small.x, &small.c, &small.c, &found[i].algo, &check) ==
              CUBLAS_STATUS_SUCCESS &&
          check.workspaceSize <= ws)
        pick = &found[i];
    }
    require(pick != nullptr, w.name,
            "cuBLASLt has no INT8 GEMM for {} x {} (out x in) at {}..{} rows ({}); use --device cpu", w.out, w.in, lo,
            hi, st == CUBLAS_STATUS_SUCCESS ? cformat("{} candidates refused", count) : cublasGetStatusString(st));
    buckets.push_back(pick->algo);
  }
  algos_.emplace(key, std::move(buckets));
}

void W8A8Gemm::run(const W8A8Weights& w, const __half* x, int64_t rows, __half* y, cudaStream_t stream) {
  const auto it = algos_.find(std::make_pair(w.out, w.in));
  require(it != algos_.end(), w.name, "W8A8Gemm::run: the {} x {} shape was not prepared", w.out, w.in);
  require(rows >= 1 && rows <= max_rows_, w.name, "{} rows for a W8A8 GEMM sized for 1..{}", rows, max_rows_);
  require(reinterpret_cast<uintptr_t>(y) % 8 == 0, w.name, "the W8A8 output at {} is not 8-byte aligned",
          static_cast<const void*>(y));
  quantize_rows_int8(x, rows, w.in, w.perm.get(), w.act_clip, act_codes_.get(), act_scales_.get(), stream);
  Layouts l(w.out, w.in, gemm_rows(rows));
  const int32_t alpha = 1, beta = 0;
  NIBBLE_CUBLAS_CHECK(cublasLtMatmul(handle_, &desc_, &alpha, w.codes.get(), &l.w, act_codes_.get(), &l.x, &beta,
                                     acc_.get(), &l.c, acc_.get(), &l.c, &it->second[size_t(bucket_of(rows))],
                                     workspace_.get(), workspace_.size(), stream));
  w8a8_rescale(acc_.get(), act_scales_.get(), w.scales.get(), w.bias.get(), rows, w.out, y, stream);
}

}  // namespace nibble::cuda
