// bench_gemm_w4a4: Atom W4A4 GEMM (gemm_w4a4) vs cuBLAS fp16, cuBLASLt fp8 with 128-wide block
// scales on both operands, and cuBLASLt INT8, all measured in the same run, on the linear layers
// of Llama-2-7B and -70B (norm_quantize, the activation side: bench_norm_quantize).
// Timing: CUDA events around batches of launches, warm-up first, median of the batches, inputs
// rotated over enough copies to overflow L2. Prints markdown tables (bench/RESULTS.md).
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "nibble/backend/cuda/atom_layout.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/cuda/gemm_w4a4.h"
#include "nibble/backend/cuda/gemm_w4a4_plan.h"
#include "nibble/backend/cuda/linear_fp16.h"
#include "bench/bench_cuda.cuh"

using namespace nibble::cuda;
using namespace nibble::bench;

namespace {

// Random but valid data of each kind: never zeros (they run faster than real data).
__global__ void fill_fp8(__nv_fp8_e4m3* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __nv_fp8_e4m3(4.0f * (2.0f * unit(seed, i) - 1.0f));
}
__global__ void fill_scales(__half* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = __float2half(0.01f + 0.01f * float(hash32(seed + i) >> 8) * 0x1p-24f);
}

struct Shape {
  const char* model;
  const char* name;
  int64_t N, K;
};
// Every linear the engine runs on Llama-2-7B (its q/k/v and gate/up fused too) and -70B.
const Shape kEngineLinears[] = {
    {"7B", "q/k/v fused", 12288, 4096}, {"7B", "q/k/v/o", 4096, 4096}, {"7B", "gate/up fused", 22016, 4096},
    {"7B", "gate/up", 11008, 4096},     {"7B", "down", 4096, 11008},   {"70B", "q/o", 8192, 8192},
    {"70B", "k/v", 1024, 8192},         {"70B", "gate/up", 28672, 8192}, {"70B", "down", 8192, 28672},
};

// ---- cuBLASLt baselines -------------------------------------------------------------------------

struct LtGemm {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
  std::string note;
  ~LtGemm() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
  }
};

void* g_lt_ws = nullptr;
const size_t kLtWs = 64 << 20;

// Yᵀ [N, M] (column-major) = op(W) [N, K] · X [K, M]: A = W (K x N col-major, transposed).
bool lt_setup(cublasLtHandle_t lt, LtGemm& g, int64_t M, int64_t N, int64_t K, cudaDataType ab, cudaDataType dt,
              cublasComputeType_t ct, cudaDataType st, int scale_mode_a, int scale_mode_b, const float* sa,
              const float* sb) {
  if (cublasLtMatmulDescCreate(&g.op, ct, st) != CUBLAS_STATUS_SUCCESS) return false;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  if (scale_mode_a >= 0) {
    const int32_t ma = scale_mode_a, mb = scale_mode_b;
    if (cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof(ma)) ||
        cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof(mb)) ||
        cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof(sa)) ||
        cublasLtMatmulDescSetAttribute(g.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof(sb)))
      return false;
  }
  cublasLtMatrixLayoutCreate(&g.a, ab, uint64_t(K), uint64_t(N), K);
  cublasLtMatrixLayoutCreate(&g.b, ab, uint64_t(K), uint64_t(M), K);
  cublasLtMatrixLayoutCreate(&g.d, dt, uint64_t(N), uint64_t(M), N);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &kLtWs, sizeof(kLtWs));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(lt, g.op, g.a, g.b, g.d, g.d, pref, 1, &res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) return false;
  g.algo = res.algo;
  g.ok = true;
  return true;
}

std::string fmt_us(double ms) {
  char b[32];
  if (ms <= 0) return "n/a";
  std::snprintf(b, sizeof b, "%.2f", ms * 1e3);
  return b;
}
std::string fmt_ratio(double base, double ours) {
  char b[32];
  if (base <= 0 || ours <= 0) return "n/a";
  std::snprintf(b, sizeof b, "%.2fx", base / ours);
  return b;
}

// Milliseconds per launch when 32 launches (rotating over the input copies) are captured into one
// CUDA graph and replayed, as the engine runs a decode step: no host launch cost between kernels.
double time_graph_ms(const std::function<void(int, cudaStream_t)>& launch, int rots) {
  constexpr int kLaunches = 32;
  launch(0, nullptr);  // first-use setup (function attributes, handles) outside the capture
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  cudaStream_t stream;
  NIBBLE_CUDA_CHECK(cudaStreamCreate(&stream));  // blocking: ordered with time_ms's events
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  NIBBLE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kLaunches; ++i) launch(i % rots, stream);
  NIBBLE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  NIBBLE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double ms = time_ms([&](int) { NIBBLE_CUDA_CHECK(cudaGraphLaunch(exec, stream)); }, 1) / kLaunches;
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  return ms;
}

// W4A4 operands of one shape (random codes and scales, rotated copies to overflow L2), the output
// and the scratch (as the executor has it: one of each buffer, shared by the rotations): times
// gemm_w4a4 on them along a given path.
struct AtomInputs {
  int64_t M, N;
  AtomShape xs, ws;
  int rots;
  std::vector<AtomDeviceMatrix> X, W;
  __half* y;
  GemmW4A4Scratch scratch;
  AtomInputs(int64_t m, int64_t n, int64_t K, int keeper)
      : M(m), N(n), xs(atom_shape(m, int(K), keeper)), ws(atom_shape(n, int(K), keeper)) {
    rots = rotations(size_t(xs.code_bytes() + ws.code_bytes() + (xs.scale_count() + ws.scale_count()) * 2));
    for (int r = 0; r < rots; ++r) {
      X.emplace_back(xs);
      W.emplace_back(ws);
      fill_bytes<<<1024, 256>>>(X.back().mut().q, size_t(xs.code_bytes()), 10 + r);
      fill_bytes<<<1024, 256>>>(W.back().mut().q, size_t(ws.code_bytes()), 20 + r);
      fill_scales<<<256, 256>>>(X.back().mut().s, size_t(xs.scale_count()), 30 + r);
      fill_scales<<<256, 256>>>(W.back().mut().s, size_t(ws.scale_count()), 40 + r);
    }
    y = dalloc<__half>(size_t(M * N));
    scratch.split_k_bytes = gemm_w4a4_split_k_bytes(M, N, int(K), keeper);
    scratch.split_k = scratch.split_k_bytes ? dalloc<uint8_t>(scratch.split_k_bytes) : nullptr;
    if (scratch.split_k) NIBBLE_CUDA_CHECK(cudaMemset(scratch.split_k, 0, scratch.split_k_bytes));
    scratch.x_int8_bytes = gemm_w4a4_x_int8_bytes(M, int(K), keeper);
    scratch.x_int8 = dalloc<uint8_t>(scratch.x_int8_bytes);
    scratch.stream_k_bytes = gemm_w4a4_stream_k_bytes(M, N, int(K), keeper);
    scratch.stream_k = dalloc<uint8_t>(scratch.stream_k_bytes);
    NIBBLE_CUDA_CHECK(cudaMemset(scratch.stream_k, 0, scratch.stream_k_bytes));
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~AtomInputs() {
    cudaFree(y);
    cudaFree(scratch.split_k);
    cudaFree(scratch.x_int8);
    cudaFree(scratch.stream_k);
  }
  // Packed operand bytes plus the fp16 output: what a kernel must move at least.
  double bytes() const { return double(xs.packed_bytes() + ws.packed_bytes()) + double(M * N * 2); }
  void run(int r, GemmPath path, cudaStream_t stream = nullptr) {
    gemm_w4a4(X[size_t(r)].view(), W[size_t(r)].view(), y, OutType::F16, scratch, stream, path);
  }
  double time(GemmPath path) {
    return time_ms([&](int r) { run(r, path); }, rots);
  }
  double time_in_graph(GemmPath path) {
    return time_graph_ms([&](int r, cudaStream_t stream) { run(r, path, stream); }, rots);
  }
  // The wgmma path's repack alone (its share of `wgmma µs`: what norm_quantize writing the layout
  // directly saves).
  double time_repack() {
    return time_ms([&](int r) { x_to_int8_b_layout(X[size_t(r)].view(), scratch.x_int8, nullptr); }, rots);
  }
  // A wgmma kernel alone on X pre-widened (a copy per rotation, made by the repack once), as the
  // executor runs it from kWgmmaMinM rows: the quantizers write that layout, so no repack runs. `path`:
  // Auto's choice, or Wgmma (v9) / WgmmaStreamK forced.
  std::vector<DeviceArray<uint8_t>> pre_widened;
  double time_pre_widened(GemmPath path = GemmPath::Auto) {
    for (int r = int(pre_widened.size()); r < rots; ++r) {
      pre_widened.emplace_back(scratch.x_int8_bytes);
      x_to_int8_b_layout(X[size_t(r)].view(), pre_widened.back().get(), nullptr);
    }
    return time_ms(
        [&](int r) {
          gemm_w4a4(XInt8Operand{pre_widened[size_t(r)].get(), xs}, W[size_t(r)].view(), y, OutType::F16, nullptr, path,
                    scratch);
        },
        rots);
  }
};

// The FP16 linear (LinearFp16: our weight-streaming kernel up to kGemvMaxRows rows, cuBLAS above) on
// rotated random inputs of the same shape: the FP16 path the engine runs is the baseline W4A4 must beat.
double time_fp16(LinearFp16& fp16, int64_t M, int64_t N, int64_t K, bool in_graph = false) {
  const int fr = rotations(size_t((M + N) * K * 2));
  std::vector<__half*> xa, wa;
  for (int r = 0; r < fr; ++r) {
    xa.push_back(dalloc<__half>(size_t(M * K)));
    wa.push_back(dalloc<__half>(size_t(N * K)));
    fill_half<<<1024, 256>>>(xa.back(), size_t(M * K), 1.0f, 50 + r);
    fill_half<<<1024, 256>>>(wa.back(), size_t(N * K), 0.05f, 60 + r);
  }
  __half* y = dalloc<__half>(size_t(M * N));
  const auto launch = [&](int r, cudaStream_t stream) { fp16.run(xa[size_t(r)], wa[size_t(r)], y, M, N, K, stream); };
  const double t = in_graph ? time_graph_ms(launch, fr) : time_ms([&](int r) { launch(r, nullptr); }, fr);
  for (auto q : xa) cudaFree(q);
  for (auto q : wa) cudaFree(q);
  cudaFree(y);
  return t;
}

}  // namespace

// `bench_gemm_w4a4 one M N K [path]`: five calls of gemm_w4a4 alone (keeper 128), for ncu (the
// wgmma and streamk paths: repack + kernel each; `pre-widened`: one repack, then five wgmma kernels on its output).
int run_one(int64_t M, int64_t N, int64_t K, GemmPath path, bool pre_widened) {
  const AtomShape xs = atom_shape(M, int(K), 128), wsh = atom_shape(N, int(K), 128);
  AtomDeviceMatrix X(xs), W(wsh);
  fill_bytes<<<1024, 256>>>(X.mut().q, size_t(xs.code_bytes()), 1);
  fill_bytes<<<1024, 256>>>(W.mut().q, size_t(wsh.code_bytes()), 2);
  fill_scales<<<256, 256>>>(X.mut().s, size_t(xs.scale_count()), 3);
  fill_scales<<<256, 256>>>(W.mut().s, size_t(wsh.scale_count()), 4);
  __half* y = dalloc<__half>(size_t(M * N));
  GemmW4A4Scratch scratch;
  scratch.split_k_bytes = gemm_w4a4_split_k_bytes(M, N, int(K), 128);
  scratch.split_k = scratch.split_k_bytes ? dalloc<uint8_t>(scratch.split_k_bytes) : nullptr;
  if (scratch.split_k) NIBBLE_CUDA_CHECK(cudaMemset(scratch.split_k, 0, scratch.split_k_bytes));
  scratch.x_int8_bytes = gemm_w4a4_x_int8_bytes(M, int(K), 128);
  scratch.x_int8 = dalloc<uint8_t>(scratch.x_int8_bytes);
  scratch.stream_k_bytes = gemm_w4a4_stream_k_bytes(M, N, int(K), 128);
  scratch.stream_k = dalloc<uint8_t>(scratch.stream_k_bytes);
  NIBBLE_CUDA_CHECK(cudaMemset(scratch.stream_k, 0, scratch.stream_k_bytes));
  if (pre_widened) x_to_int8_b_layout(X.view(), scratch.x_int8, nullptr);
  for (int i = 0; i < 5; ++i) {
    if (pre_widened) gemm_w4a4(XInt8Operand{scratch.x_int8, xs}, W.view(), y, OutType::F16, nullptr);
    else gemm_w4a4(X.view(), W.view(), y, OutType::F16, scratch, nullptr, path);
  }
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  cudaFree(scratch.split_k);
  cudaFree(scratch.x_int8);
  cudaFree(scratch.stream_k);
  std::printf("one: M=%lld N=%lld K=%lld packed bytes %lld\n", (long long)M, (long long)N, (long long)K,
              (long long)(xs.packed_bytes() + wsh.packed_bytes() + M * N * 2));
  return 0;
}

// `bench_gemm_w4a4 decode`: M <= 16 on every layer the engine runs (7B's fused q/k/v and gate/up
// included), each kernel timed inside a CUDA graph of 32 launches as the engine's decode step runs
// them (the stream kernel's programmatic dependent launch overlaps a launch with the previous
// one's tail), and the stream kernel also launched eagerly, all in the same run with the FP16 linear (streaming kernel at M <= 4, cuBLAS above).
int run_decode(double copy_gbs) {
  const int keeper = 128;
  LinearFp16 fp16;
  std::printf("| model | layer | M | N | K | dispatched | stream plan (blocks / cluster / pairs a block) | stream µs (graph) | %% copy BW | decode µs (graph) | %% copy BW | stream µs (eager) | fp16 µs (graph) | best vs fp16 |\n");
  std::printf("|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& sh : kEngineLinears) {
    for (int64_t M : {1, 2, 4, 8, 16}) {
      const int64_t N = sh.N, K = sh.K;
      double t_stream, t_decode, t_eager, bytes;
      bool streams;
      {
        AtomInputs in(M, N, K, keeper);
        t_stream = in.time_in_graph(GemmPath::Stream);
        t_decode = in.time_in_graph(GemmPath::Decode);
        t_eager = in.time(GemmPath::Stream);
        bytes = in.bytes();
        streams = gemm_w4a4_auto_streams(M, in.ws.packed_bytes());
      }
      const double t_fp16 = time_fp16(fp16, M, N, K, true);
      const auto pct = [&](double ms) { return 100.0 * bytes / (ms * 1e-3) / 1e9 / copy_gbs; };
      const StreamPlan plan = gemm_w4a4_stream_plan(N, int(K), keeper);
      std::printf("| %s | %s | %lld | %lld | %lld | %s | %d / %d / %d | %.2f | %.0f%% | %.2f | %.0f%% | %.2f | %.2f | %s |\n", sh.model,
                  sh.name, (long long)M, (long long)N, (long long)K, streams ? "stream" : "decode", plan.blocks,
                  plan.cluster, plan.pairs_per_block, t_stream * 1e3,
                  pct(t_stream), t_decode * 1e3, pct(t_decode), t_eager * 1e3, t_fp16 * 1e3,
                  fmt_ratio(t_fp16, std::min(t_stream, t_decode)).c_str());
      std::fflush(stdout);
    }
  }
  return 0;
}

// `bench_gemm_w4a4 streamk [M ...]`: GemmPath::WgmmaStreamK against v9 (GemmPath::Wgmma), both on X
// pre-widened (the kernels alone, as the executor runs them from kWgmmaMinM rows), beside Auto from
// packed X (from kWgmmaMinM rows: repack + stream-K where stream_k_measured_win, else v9; below: the
// decode kernel) and the FP16 linear, all in the same run, with the plans' slab-time costs
// (gemm_w4a4_plan.h) for the model's ratio.
int run_stream_k(const std::vector<int64_t>& Ms, int sms) {
  const int keeper = 128;
  LinearFp16 fp16;
  std::printf("| model | layer | M | tiles | v9 cluster | stream-K blocks | Auto µs | v9 µs | stream-K µs | fp16 µs | v9 / stream-K | model v9 / stream-K | fp16 / stream-K | fp16 / v9 |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& sh : kEngineLinears) {
    for (int64_t M : Ms) {
      const AtomShape xs = atom_shape(M, int(sh.K), keeper), ws = atom_shape(sh.N, int(sh.K), keeper);
      const int64_t tiles = wgmma_tiles(ws.rows_pad, xs.rows_pad);
      const WgmmaClusterPlan v9_plan = wgmma_cluster_plan(tiles, ws.slabs(), sms);
      const StreamKPlan sk_plan = stream_k_plan(tiles, ws.slabs(), sms);
      double t_auto, t_v9, t_sk;
      {
        AtomInputs in(M, sh.N, sh.K, keeper);
        t_auto = in.time(GemmPath::Auto);
        t_v9 = in.time_pre_widened(GemmPath::Wgmma);
        t_sk = in.time_pre_widened(GemmPath::WgmmaStreamK);
      }
      const double t_fp16 = time_fp16(fp16, M, sh.N, sh.K);
      std::printf("| %s | %s | %lld | %lld | %d | %d | %.2f | %.2f | %.2f | %.2f | %s | %.2fx | %s | %s |\n", sh.model, sh.name,
                  (long long)M, (long long)tiles, v9_plan.cluster, sk_plan.blocks, t_auto * 1e3, t_v9 * 1e3, t_sk * 1e3,
                  t_fp16 * 1e3, fmt_ratio(t_v9, t_sk).c_str(), v9_plan.cost / sk_plan.cost, fmt_ratio(t_fp16, t_sk).c_str(),
                  fmt_ratio(t_fp16, t_v9).c_str());
      std::fflush(stdout);
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  // "gemm [M ...]" (only these M), "decode", "streamk [M ...]", "one M N K [wgmma|lockstep|streamk|pre-widened]"
  // (for ncu) or empty (gemm)
  std::string only = argc > 1 ? argv[1] : "";
  if (only == "one" && (argc == 5 || argc == 6)) {
    const std::string forced = argc == 6 ? argv[5] : "";
    const GemmPath path = forced == "wgmma"      ? GemmPath::Wgmma
                          : forced == "lockstep" ? GemmPath::WgmmaLockstep
                          : forced == "streamk"  ? GemmPath::WgmmaStreamK
                                                 : GemmPath::Auto;
    return run_one(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]), path, forced == "pre-widened");
  }
  cudaDeviceProp prop{};
  NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  g_l2 = size_t(prop.l2CacheSize);
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  std::printf("device: %s, %d SMs, L2 %zu MB, CUDA runtime %d, cuBLASLt %zu\n", prop.name, prop.multiProcessorCount,
              g_l2 >> 20, runtime, cublasLtGetVersion());
  const double copy_gbs = copy_bandwidth();
  std::printf("copy bandwidth (cudaMemcpy D2D 1 GiB, read + write): %.0f GB/s\n\n", copy_gbs);
  if (only == "decode") return run_decode(copy_gbs);
  if (only == "streamk") {
    std::vector<int64_t> Ms = {64, 100, 128, 192, 256, 512, 1024, 2048};
    if (argc > 2) Ms.clear();
    for (int i = 2; i < argc; ++i) Ms.push_back(std::atoll(argv[i]));
    return run_stream_k(Ms, prop.multiProcessorCount);
  }

  LinearFp16 fp16;
  cublasLtHandle_t lt;
  NIBBLE_CUBLAS_CHECK(cublasLtCreate(&lt));
  g_lt_ws = dalloc<uint8_t>(kLtWs);

  const Shape shapes[] = {
      {"7B", "q/k/v/o", 4096, 4096},    {"7B", "gate/up", 11008, 4096}, {"7B", "down", 4096, 11008},
      {"70B", "q/o", 8192, 8192},       {"70B", "k/v", 1024, 8192},     {"70B", "gate/up", 28672, 8192},
      {"70B", "down", 8192, 28672},
  };
  std::vector<int64_t> Ms = {1, 16, 64, 256, 1024, 4096};
  if (only == "gemm" && argc > 2) {
    Ms.clear();
    for (int i = 2; i < argc; ++i) Ms.push_back(std::atoll(argv[i]));
  }
  const int keeper = 128;

  if (only.empty() || only == "gemm") {
    std::printf("| model | layer | M | N | K | w4a4 µs | TOPS | GB/s packed | %% copy BW | stream µs | decode µs | wgmma µs | repack µs | pre-widened µs | lockstep µs | fp16 µs | vs fp16 | pre-widened vs fp16 | fp8-blk µs | vs fp8-blk | int8 µs | vs int8 |\n");
    std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (const Shape& sh : shapes) {
      for (int64_t M : Ms) {
        const int64_t N = sh.N, K = sh.K;
        const double flops = 2.0 * double(M) * double(N) * double(K);
        // ---- ours
        double t_ours, t_stream = 0, t_decode = 0, t_wgmma = 0, t_repack = 0, t_pre = 0, t_lockstep = 0, bytes;
        {
          AtomInputs in(M, N, K, keeper);
          t_ours = in.time(GemmPath::Auto);
          // Beside it on the same inputs: every kernel that can take this M.
          if (M <= kStreamMaxM) t_stream = in.time(GemmPath::Stream);
          if (M <= 64) t_decode = in.time(GemmPath::Decode);
          if (M > kStreamMaxM) t_wgmma = in.time(GemmPath::Wgmma);  // repack + kernel
          if (M > kStreamMaxM) t_repack = in.time_repack();
          if (M > kStreamMaxM) t_pre = in.time_pre_widened();
          if (M > kStreamMaxM) t_lockstep = in.time(GemmPath::WgmmaLockstep);
          bytes = in.bytes();
        }
        const double t_fp16 = time_fp16(fp16, M, N, K);

        // ---- cuBLASLt fp8 e4m3, 128-wide block scales on both operands (bf16 out)
        double t_fp8 = 0;
        std::string fp8_note;
        {
          const int fr = rotations(size_t((M + N) * K));
          std::vector<__nv_fp8_e4m3*> xa, wa;
          for (int r = 0; r < fr; ++r) {
            xa.push_back(dalloc<__nv_fp8_e4m3>(size_t(M * K)));
            wa.push_back(dalloc<__nv_fp8_e4m3>(size_t(N * K)));
            fill_fp8<<<1024, 256>>>(xa.back(), size_t(M * K), 70 + r);
            fill_fp8<<<1024, 256>>>(wa.back(), size_t(N * K), 80 + r);
          }
          // Scale tensors: generous sizes (any of the documented layouts fits), all one value.
          const size_t ns = size_t((N + 128) * (K / 128 + 4)), ms_ = size_t((M + 128) * (K / 128 + 4));
          float* sa = dalloc<float>(ns);
          float* sb = dalloc<float>(ms_);
          fill_float<<<256, 256>>>(sa, ns, 0.01f);
          fill_float<<<256, 256>>>(sb, ms_, 0.01f);
          __nv_bfloat16* yb = dalloc<__nv_bfloat16>(size_t(M * N));
          LtGemm g;
          const int vec128 = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, blk = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
          bool ok = lt_setup(lt, g, M, N, K, CUDA_R_8F_E4M3, CUDA_R_16BF, CUBLAS_COMPUTE_32F, CUDA_R_32F, vec128, vec128, sa, sb);
          if (ok) fp8_note = "1x128 both";
          if (!ok) {
            LtGemm g2;
            ok = lt_setup(lt, g2, M, N, K, CUDA_R_8F_E4M3, CUDA_R_16BF, CUBLAS_COMPUTE_32F, CUDA_R_32F, blk, vec128, sa, sb);
            if (ok) {
              std::swap(g.op, g2.op);
              std::swap(g.a, g2.a);
              std::swap(g.b, g2.b);
              std::swap(g.d, g2.d);
              g.algo = g2.algo;
              fp8_note = "W 128x128";
            }
          }
          if (ok) {
            const float alpha = 1, beta = 0;
            bool failed = false;
            t_fp8 = time_ms(
                [&](int r) {
                  if (failed) return;
                  const cublasStatus_t s = cublasLtMatmul(lt, g.op, &alpha, wa[size_t(r)], g.a, xa[size_t(r)], g.b, &beta,
                                                          yb, g.d, yb, g.d, &g.algo, g_lt_ws, kLtWs, nullptr);
                  if (s != CUBLAS_STATUS_SUCCESS) failed = true;
                },
                fr);
            if (failed) t_fp8 = 0;
          }
          for (auto p : xa) cudaFree(p);
          for (auto p : wa) cudaFree(p);
          cudaFree(sa);
          cudaFree(sb);
          cudaFree(yb);
        }

        // ---- cuBLASLt INT8 (int32 out)
        double t_int8 = 0;
        {
          const int fr = rotations(size_t((M + N) * K));
          std::vector<uint8_t*> xa, wa;
          for (int r = 0; r < fr; ++r) {
            xa.push_back(dalloc<uint8_t>(size_t(M * K)));
            wa.push_back(dalloc<uint8_t>(size_t(N * K)));
            fill_bytes<<<1024, 256>>>(xa.back(), size_t(M * K), 90 + r);
            fill_bytes<<<1024, 256>>>(wa.back(), size_t(N * K), 100 + r);
          }
          int32_t* yi = dalloc<int32_t>(size_t(M * N));
          LtGemm g;
          if (lt_setup(lt, g, M, N, K, CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I, CUDA_R_32I, -1, -1, nullptr, nullptr)) {
            const int32_t alpha = 1, beta = 0;
            bool failed = false;
            t_int8 = time_ms(
                [&](int r) {
                  if (failed) return;
                  const cublasStatus_t s = cublasLtMatmul(lt, g.op, &alpha, wa[size_t(r)], g.a, xa[size_t(r)], g.b, &beta,
                                                          yi, g.d, yi, g.d, &g.algo, g_lt_ws, kLtWs, nullptr);
                  if (s != CUBLAS_STATUS_SUCCESS) failed = true;
                },
                fr);
            if (failed) t_int8 = 0;
          }
          for (auto p : xa) cudaFree(p);
          for (auto p : wa) cudaFree(p);
          cudaFree(yi);
        }
        cudaGetLastError();  // a refused Lt call must not poison the next row

        std::printf("| %s | %s | %lld | %lld | %lld | %.2f | %.0f | %.0f | %.0f%% | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", sh.model,
                    sh.name, (long long)M, (long long)N, (long long)K, t_ours * 1e3, flops / (t_ours * 1e-3) / 1e12,
                    bytes / (t_ours * 1e-3) / 1e9, 100.0 * bytes / (t_ours * 1e-3) / 1e9 / copy_gbs, fmt_us(t_stream).c_str(),
                    fmt_us(t_decode).c_str(), fmt_us(t_wgmma).c_str(), fmt_us(t_repack).c_str(), fmt_us(t_pre).c_str(),
                    fmt_us(t_lockstep).c_str(), fmt_us(t_fp16).c_str(),
                    fmt_ratio(t_fp16, t_ours).c_str(), fmt_ratio(t_fp16, t_pre).c_str(), fmt_us(t_fp8).c_str(), fmt_ratio(t_fp8, t_ours).c_str(),
                    fmt_us(t_int8).c_str(), fmt_ratio(t_int8, t_ours).c_str());
        if (!fp8_note.empty() && fp8_note != "1x128 both") std::printf("<!-- fp8 scales: %s -->\n", fp8_note.c_str());
        std::fflush(stdout);
      }
    }
    std::printf("\n");
  }

  cublasLtDestroy(lt);
  return 0;
}
