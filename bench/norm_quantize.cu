// bench_norm_quantize: the activation-side kernels of gemm_w4a4 (rmsnorm_quantize,
// gather_quantize, swiglu_quantize; keeper 128) on the Llama-2-7B and -70B widths, against the
// device's copy bandwidth measured in the same run. Bytes = fp16 input(s) read + packed operand
// written. Two times per case: launches on a stream (CUDA events around batches, median, inputs
// rotated past L2; bench_cuda.cuh) and the same launches replayed from a CUDA graph, as the
// executor's captured decode step runs them (launch cost hidden; what is left is the kernel).
// From kWgmmaMinM rows also the quantizers writing X pre-widened (the wgmma GEMM's input, as the executor
// runs them there) beside the repack of the packed output they replace (x_to_int8_b_layout):
// pre-widened vs packed + repack.
// `bench_norm_quantize residual`: the executor's norm before a W4A4 linear as two kernels
// (residual_rmsnorm writing h and an fp16 copy, then rmsnorm_quantize of the copy) against the fused
// residual_rmsnorm_quantize, pairs replayed from a graph, the output pre-widened from kWgmmaMinM rows as
// the executor writes it.
// `bench_norm_quantize one M K`: five launches of rmsnorm_quantize alone, for ncu.
#include <cuda_fp16.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "nibble/backend/cuda/atom_layout.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/cuda/gemm_w4a4.h"
#include "nibble/backend/cuda/model_kernels.h"
#include "nibble/backend/cuda/norm_quantize.h"
#include "bench/bench_cuda.cuh"

using namespace nibble::cuda;
using namespace nibble::bench;

namespace {

constexpr int kKeeper = 128;

enum class Kernel { Norm, Gather, Swiglu };

const char* kernel_name(Kernel k) {
  return k == Kernel::Norm ? "rmsnorm_quantize" : k == Kernel::Gather ? "gather_quantize" : "swiglu_quantize";
}


// A permutation of K channels on the device (a bijection: gcd(7919, K) = 1), as the model's reorder.
int32_t* device_permutation(int K) {
  std::vector<int32_t> hp(static_cast<size_t>(K));
  for (int j = 0; j < K; ++j) hp[size_t(j)] = int32_t((int64_t(j) * 7919) % K);
  int32_t* perm = dalloc<int32_t>(size_t(K));
  NIBBLE_CUDA_CHECK(cudaMemcpy(perm, hp.data(), hp.size() * 4, cudaMemcpyHostToDevice));
  return perm;
}

// Inputs and outputs of one case, `rots` copies; the permutation and norm weight are shared, as in the model. swiglu runs without a permutation, as the executor
// calls it (gate/up rows carry the order).
struct Case {
  Kernel kernel;
  int64_t M;
  int K;
  int rots = 1;
  std::vector<__half*> a, u;
  std::vector<AtomDeviceMatrix> out;
  std::vector<DeviceArray<uint8_t>> pre_widened;  // from kWgmmaMinM rows: the same rows pre-widened
  int32_t* perm = nullptr;
  float* w = nullptr;

  Case(Kernel k, int64_t m, int kk) : kernel(k), M(m), K(kk) {
    const AtomShape sh = atom_shape(M, K, kKeeper);
    rots = rotations(in_bytes() + size_t(sh.code_bytes()));
    for (int r = 0; r < rots; ++r) {
      a.push_back(dalloc<__half>(size_t(M * K)));
      u.push_back(dalloc<__half>(kernel == Kernel::Swiglu ? size_t(M * K) : 1));
      fill_half<<<1024, 256>>>(a.back(), size_t(M * K), 3.0f, 110 + r);
      if (kernel == Kernel::Swiglu) fill_half<<<1024, 256>>>(u.back(), size_t(M * K), 3.0f, 120 + r);
      out.emplace_back(sh);
      if (gemm_w4a4_takes_x_int8(M)) pre_widened.emplace_back(gemm_w4a4_x_int8_bytes(M, K, kKeeper));
    }
    perm = device_permutation(K);
    w = dalloc<float>(size_t(K));
    fill_float<<<64, 256>>>(w, size_t(K), 1.0f);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~Case() {
    for (auto p : a) cudaFree(p);
    for (auto p : u) cudaFree(p);
    cudaFree(perm);
    cudaFree(w);
  }
  size_t in_bytes() const { return size_t(M * K * 2) * (kernel == Kernel::Swiglu ? 2 : 1); }
  double bytes() const { return double(in_bytes()) + double(atom_shape(M, K, kKeeper).packed_bytes()); }

  // The packed output, or (pre_widened_out) X pre-widened.
  void launch(int r, cudaStream_t s, bool pre_widened_out = false) {
    const ActQuant q{};
    const ActOutput o = pre_widened_out ? ActOutput::pre_widened(pre_widened[size_t(r)].get(), out[size_t(r)].shape())
                                        : ActOutput(out[size_t(r)].mut());
    switch (kernel) {
      case Kernel::Norm: rmsnorm_quantize(a[size_t(r)], K, perm, w, 1e-5f, o, q, s); break;
      case Kernel::Gather: gather_quantize(a[size_t(r)], K, perm, o, q, s); break;
      case Kernel::Swiglu: swiglu_quantize(a[size_t(r)], u[size_t(r)], K, nullptr, o, q, s); break;
    }
  }
  // What the pre-widened output saves: the repack of the packed one.
  void repack(int r, cudaStream_t s) { x_to_int8_b_layout(out[size_t(r)].view(), pre_widened[size_t(r)].get(), s); }
};

// Milliseconds per launch when `per_graph` launches (rotating inputs: launch(r, stream), r < rots) are
// replayed from one graph.
double graph_ms_of(const std::function<void(int, cudaStream_t)>& launch, int rots) {
  constexpr int per_graph = 32;
  cudaStream_t s;
  NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t graph;
  NIBBLE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < per_graph; ++i) launch(i % rots, s);
  NIBBLE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec;
  NIBBLE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double ms = time_ms([&](int) { NIBBLE_CUDA_CHECK(cudaGraphLaunch(exec, nullptr)); }, 1) / per_graph;
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  return ms;
}
double graph_ms(Case& c, bool pre_widened_out = false) {
  return graph_ms_of([&](int r, cudaStream_t s) { c.launch(r, s, pre_widened_out); }, c.rots);
}

// The norm before a W4A4 linear, as the executor ran it (two kernels) and as it runs it now (one).
struct ResidualCase {
  int64_t M;
  int K;
  int rots = 1;
  std::vector<float*> h;
  std::vector<__half*> y, h16;
  std::vector<AtomDeviceMatrix> out;
  std::vector<DeviceArray<uint8_t>> pre_widened;
  int32_t* perm = nullptr;
  float* w = nullptr;
  int* counters = nullptr;

  ResidualCase(int64_t m, int k) : M(m), K(k) {
    const AtomShape sh = atom_shape(M, K, kKeeper);
    rots = rotations(size_t(M * K) * (4 + 2 + 2) + size_t(sh.code_bytes()));
    for (int r = 0; r < rots; ++r) {
      h.push_back(dalloc<float>(size_t(M * K)));
      y.push_back(dalloc<__half>(size_t(M * K)));
      h16.push_back(dalloc<__half>(size_t(M * K)));
      fill_float<<<1024, 256>>>(h.back(), size_t(M * K), 0.5f);
      fill_half<<<1024, 256>>>(y.back(), size_t(M * K), 1.0f, 130 + r);
      out.emplace_back(sh);
      if (gemm_w4a4_takes_x_int8(M)) pre_widened.emplace_back(gemm_w4a4_x_int8_bytes(M, K, kKeeper));
    }
    perm = device_permutation(K);
    w = dalloc<float>(size_t(K));
    fill_float<<<64, 256>>>(w, size_t(K), 1.0f);
    counters = dalloc<int>(size_t(M));
    NIBBLE_CUDA_CHECK(cudaMemset(counters, 0, size_t(M) * sizeof(int)));
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  ~ResidualCase() {
    for (auto p : h) cudaFree(p);
    for (auto p : y) cudaFree(p);
    for (auto p : h16) cudaFree(p);
    cudaFree(perm);
    cudaFree(w);
    cudaFree(counters);
  }
  ActOutput output(int r) {
    return pre_widened.empty() ? ActOutput(out[size_t(r)].mut())
                               : ActOutput::pre_widened(pre_widened[size_t(r)].get(), out[size_t(r)].shape());
  }
  void launch(int r, cudaStream_t s, bool fused) {
    if (fused) {
      residual_rmsnorm_quantize(h[size_t(r)], y[size_t(r)], perm, w, 1e-5f, output(r), ActQuant{}, counters, s);
      return;
    }
    residual_rmsnorm(h[size_t(r)], y[size_t(r)], M, K, nullptr, 1e-5f, nullptr, h16[size_t(r)], s);
    rmsnorm_quantize(h16[size_t(r)], K, perm, w, 1e-5f, output(r), ActQuant{}, s);
  }
};

double residual_graph_ms(ResidualCase& c, bool fused) {
  return graph_ms_of([&](int r, cudaStream_t s) { c.launch(r, s, fused); }, c.rots);
}

int run_residual(double copy_gbs) {
  std::printf("| model | M | K | two kernels µs (graph) | fused µs (graph) | two / fused | fused GB/s | %% copy BW |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& [model, K] : {std::pair{"7B", 4096}, std::pair{"70B", 8192}}) {
    for (int64_t M : {1, 16, 100, 256, 4096}) {
      ResidualCase c(M, K);
      const double two = residual_graph_ms(c, false), fused = residual_graph_ms(c, true);
      // The fused kernel's bytes: h and y read, h written, the operand written.
      const double bytes = double(M * K) * (4 + 2 + 4) + double(atom_shape(M, K, kKeeper).packed_bytes());
      const double gbs = bytes / (fused * 1e-3) / 1e9;
      std::printf("| %s | %lld | %d | %.1f | %.1f | %.2fx | %.0f | %.0f%% |\n", model, (long long)M, K, two * 1e3,
                  fused * 1e3, two / fused, gbs, 100.0 * gbs / copy_gbs);
      std::fflush(stdout);
    }
  }
  return 0;
}

int run_one(int64_t M, int K) {
  Case c(Kernel::Norm, M, K);
  for (int i = 0; i < 5; ++i) c.launch(0, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  std::printf("one: M=%lld K=%d bytes in+out %.0f\n", (long long)M, K, c.bytes());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "one") return run_one(std::atoll(argv[2]), std::atoi(argv[3]));
  cudaDeviceProp prop{};
  NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  g_l2 = size_t(prop.l2CacheSize);
  std::printf("device: %s, %d SMs, L2 %zu MB\n", prop.name, prop.multiProcessorCount, g_l2 >> 20);
  const double copy_gbs = copy_bandwidth();
  std::printf("copy bandwidth (cudaMemcpy D2D 1 GiB, read + write): %.0f GB/s\n\n", copy_gbs);
  if (argc == 2 && std::string(argv[1]) == "residual") return run_residual(copy_gbs);

  struct Shape {
    const char* model;
    Kernel kernel;
    int K;
  };
  const Shape shapes[] = {{"7B", Kernel::Norm, 4096},   {"7B", Kernel::Gather, 4096},  {"7B", Kernel::Swiglu, 11008},
                          {"70B", Kernel::Norm, 8192},  {"70B", Kernel::Gather, 8192}, {"70B", Kernel::Swiglu, 28672}};
  std::printf("| model | kernel | M | K | µs | GB/s | %% copy BW | µs in a graph | GB/s | %% copy BW | pre-widened µs | "
              "in a graph | repack µs | pre-widened vs packed + repack |\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& sh : shapes) {
    for (int64_t M : {1, 16, 256, 4096}) {
      Case c(sh.kernel, M, sh.K);
      const double ms = time_ms([&](int r) { c.launch(r, nullptr); }, c.rots);
      const double gms = graph_ms(c);
      const double gbs = c.bytes() / (ms * 1e-3) / 1e9, ggbs = c.bytes() / (gms * 1e-3) / 1e9;
      std::printf("| %s | %s | %lld | %d | %.1f | %.0f | %.0f%% | %.1f | %.0f | %.0f%% |", sh.model,
                  kernel_name(sh.kernel), (long long)M, sh.K, ms * 1e3, gbs, 100.0 * gbs / copy_gbs, gms * 1e3, ggbs,
                  100.0 * ggbs / copy_gbs);
      if (gemm_w4a4_takes_x_int8(M)) {
        const double pms = time_ms([&](int r) { c.launch(r, nullptr, true); }, c.rots);
        const double pgms = graph_ms(c, true);
        const double rms = time_ms([&](int r) { c.repack(r, nullptr); }, c.rots);
        std::printf(" %.1f | %.1f | %.1f | %.2fx |\n", pms * 1e3, pgms * 1e3, rms * 1e3, (ms + rms) / pms);
      } else {
        std::printf(" | | | |\n");
      }
      std::fflush(stdout);
    }
  }
  return 0;
}
