// Attention over the paged KV cache on the device:
//   decode:  batch {1, 16, 64, 256} x context {512, 2048, 8192}, Llama-2-7B (32 heads, MHA) and
//            Llama-2-70B (64 query / 8 KV heads) shapes, head_dim 128, one layer: time, GB/s on the
//            KV bytes the step must read (codes + scales + zeros of every cached token), % of the
//            copy bandwidth measured in the same run, INT4 vs our FP16-KV decode.
//   prefill: 512 / 2048 / 8192-token prompts (16384 tokens per batch), causal, TFLOP/s of each
//            prefill path (mma.sync and wgmma, INT4 and FP16 pages) against
//            torch.nn.functional.scaled_dot_product_attention's flash and cuDNN backends run in the
//            same process run (bench/attention_sdpa.py through popen, before our allocations).
// Timing: CUDA events around batches of launches after warm-up, median of the batches; decode
// inputs rotated over enough distinct caches (block tables over disjoint pages) to overflow L2.
// Pool contents are random valid codes/scales/values, never zeros.
//   bench_attention [all|decode|prefill]
//   bench_attention one-decode int4|fp16 7B|70B BATCH CTX   (a few launches, for ncu)
//   bench_attention decode-splits   (INT4 decode at batch 1-16: the planned split count beside forced ones)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "nibble/backend/cuda/attention_common.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/kv_cache_paged.h"
#include "bench/bench_cuda.cuh"

using namespace nibble;
using namespace nibble::cuda;
using namespace nibble::bench;

namespace {

// Random valid blocks: INT4 codes, scales in [0.005, 0.015), zeros 0..15; FP16 values in [-1, 1).
__global__ void fill_pool(uint16_t* pool, int64_t halfwords, int64_t block_half, bool fp16, int64_t chunk,
                          int64_t ks_off, int64_t kz_off, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < halfwords; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = 2 * (i % block_half);
    const uint32_t r = hash32(seed * 0x9e3779b97f4a7c15ull + uint64_t(i));
    uint16_t v;
    if (fp16) {
      v = __half_as_ushort(__float2half(2.0f * unit(seed + 1, uint64_t(i)) - 1.0f));
    } else if (o % chunk < ks_off) {
      v = uint16_t(r);
    } else if (o % chunk < kz_off) {
      v = __half_as_ushort(__float2half(0.005f + 0.01f * unit(seed + 2, uint64_t(i))));
    } else {
      v = uint16_t((r & 15) | ((r >> 8 & 15) << 8));
    }
    pool[i] = v;
  }
}

struct Model {
  const char* name;
  int heads, kv_heads, head_dim;
};
const Model kModels[] = {{"7B", 32, 32, 128}, {"70B", 64, 8, 128}};

// A filled cache with `rots` disjoint sets of `batch` sequences of `ctx` tokens, decode-ready.
struct DecodeSetup {
  PagedKVLayout layout;
  std::unique_ptr<PagedKVCache> cache;
  std::vector<std::unique_ptr<AttentionBatchBuilder>> builders;
  std::vector<AttentionBatch> batches;
  int rots = 1;
  int64_t kv_bytes = 0;  // bytes one decode step must read

  DecodeSetup(const Model& m, KVDtype dt, int batch, int ctx) {
    layout = PagedKVLayout{1, m.kv_heads, m.head_dim, 16, dt};
    const int64_t pages_per_seq = (ctx + 15) / 16;
    kv_bytes = int64_t(batch) * ctx * layout.token_bytes_per_layer();
    const int64_t set_bytes = int64_t(batch) * pages_per_seq * layout.page_bytes();
    rots = rotations(size_t(set_bytes));
    cache = std::make_unique<PagedKVCache>(layout, rots * batch * pages_per_seq);
    const int64_t halfwords = cache->pool_bytes() / 2;
    fill_pool<<<4 * g_sms, 256>>>(reinterpret_cast<uint16_t*>(cache->view().pool), halfwords,
                                  layout.block_bytes() / 2, dt == KVDtype::Fp16, layout.chunk_bytes(),
                                  layout.k_scale_offset(0), layout.k_zero_offset(0), 11);
    NIBBLE_CUDA_CHECK_LAUNCH();
    const std::vector<int> ones(size_t(batch), 1);
    for (int r = 0; r < rots; ++r) {
      std::vector<SeqId> seqs;
      for (int i = 0; i < batch; ++i) {
        seqs.push_back(cache->add_sequence());
        if (!cache->append(seqs.back(), ctx)) throw Error("bench", "out of pages");
      }
      builders.push_back(std::make_unique<AttentionBatchBuilder>());
      batches.push_back(builders.back()->build(cache->allocator(), seqs, ones, nullptr));
    }
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

struct DecodeResult {
  double ms = 0;
  int splits = 0;
  int64_t bytes = 0;
};

// One decode launch on `s`, timed: the planned split count (splits = 0) or a forced one.
DecodeResult time_decode(const DecodeSetup& s, const Model& m, int batch, int splits = 0) {
  __half *q = nullptr, *out = nullptr;
  const size_t n = size_t(batch) * m.heads * m.head_dim;
  NIBBLE_CUDA_CHECK(cudaMalloc(&q, n * 2));
  NIBBLE_CUDA_CHECK(cudaMalloc(&out, n * 2));
  fill_half<<<256, 256>>>(q, int64_t(n), 3.0f, 5);
  AttentionWorkspace ws;
  AttentionArgs a;
  a.q = q;
  a.out = out;
  a.num_heads = m.heads;
  a.num_splits = splits;
  DecodeResult r;
  r.ms = time_ms([&](int rot) { attention_decode(s.cache->view(), s.batches[size_t(rot)], a, ws, nullptr); }, s.rots);
  r.splits = splits ? splits : attention_decode_splits(s.cache->view(), s.batches[0], m.heads);
  r.bytes = s.kv_bytes;
  cudaFree(q);
  cudaFree(out);
  return r;
}
DecodeResult bench_decode(const Model& m, KVDtype dt, int batch, int ctx) {
  const DecodeSetup s(m, dt, batch, ctx);
  return time_decode(s, m, batch);
}

// `bench_attention decode-splits`: the INT4 decode at batch 1-16 with every forced split count beside the
// plan's (attention_plan.h), to check the cost model on this GPU.
int run_decode_splits(double copy_gbs) {
  std::printf("| model | batch | context | planned splits | planned ms | %% copy BW | best splits | best ms | %% copy BW | planned / best | ms at 1 / 2 / 4 / 8 / 16 / 32 / 64 splits |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (const Model& m : kModels)
    for (int batch : {1, 4, 16})
      for (int ctx : {2048, 8192}) {
        const DecodeSetup s(m, KVDtype::Int4, batch, ctx);
        const DecodeResult planned = time_decode(s, m, batch);
        DecodeResult best = planned;
        std::string row;
        for (int splits : {1, 2, 4, 8, 16, 32, 64}) {
          const DecodeResult r = time_decode(s, m, batch, splits);
          if (r.ms < best.ms) best = r;
          char ms[32];
          std::snprintf(ms, sizeof ms, "%s%.4f", row.empty() ? "" : " / ", r.ms);
          row += ms;
        }
        const auto pct = [&](const DecodeResult& r) {
          return 100.0 * double(r.bytes) / (r.ms * 1e-3) / 1e9 / copy_gbs;
        };
        std::printf("| %s | %d | %d | %d | %.4f | %.0f%% | %d | %.4f | %.0f%% | %.2fx | %s |\n", m.name, batch, ctx,
                    planned.splits, planned.ms, pct(planned), best.splits, best.ms, pct(best), planned.ms / best.ms,
                    row.c_str());
        std::fflush(stdout);
      }
  return 0;
}

struct PrefillResult {
  double ms = 0, append_ms = 0;
};

PrefillResult bench_prefill(const Model& m, KVDtype dt, PrefillPath path, int n, int batch) {
  const PagedKVLayout layout{1, m.kv_heads, m.head_dim, 16, dt};
  const int64_t pages = int64_t(batch) * ((n + 15) / 16);
  PagedKVCache cache(layout, pages);
  std::vector<SeqId> seqs;
  for (int i = 0; i < batch; ++i) {
    seqs.push_back(cache.add_sequence());
    if (!cache.append(seqs.back(), n)) throw Error("bench", "out of pages");
  }
  const std::vector<int> counts(size_t(batch), n);
  AttentionBatchBuilder builder;
  const AttentionBatch b = builder.build(cache.allocator(), seqs, counts, nullptr);
  const int64_t T = int64_t(batch) * n, row = int64_t(m.heads + 2 * m.kv_heads) * m.head_dim;
  __half *qkv = nullptr, *q = nullptr, *out = nullptr;
  NIBBLE_CUDA_CHECK(cudaMalloc(&qkv, size_t(T * row) * 2));
  NIBBLE_CUDA_CHECK(cudaMalloc(&q, size_t(T) * m.heads * m.head_dim * 2));
  NIBBLE_CUDA_CHECK(cudaMalloc(&out, size_t(T) * m.heads * m.head_dim * 2));
  fill_half<<<4 * g_sms, 256>>>(qkv, T * row, 2.0f, 3);
  std::vector<double> inv(size_t(m.head_dim / 2));
  for (int i = 0; i < m.head_dim / 2; ++i) inv[size_t(i)] = std::pow(10000.0, -2.0 * i / m.head_dim);
  RopeTable rope(inv, n);
  AppendArgs ap;
  ap.qkv = qkv;
  ap.qkv_stride = row;
  ap.num_heads = m.heads;
  ap.rope = &rope;
  ap.q_out = q;
  AttentionArgs a;
  a.q = q;
  a.out = out;
  a.num_heads = m.heads;
  a.prefill_path = path;
  PrefillResult r;
  r.append_ms = time_ms([&](int) { attention_append(cache.view(), b, ap, nullptr); }, 1);
  r.ms = time_ms([&](int) { attention_prefill(cache.view(), b, a, nullptr); }, 1);
  cudaFree(qkv);
  cudaFree(q);
  cudaFree(out);
  return r;
}

constexpr int kPrefillTokens = 16384;
const int kPrefillN[] = {512, 2048, 8192};

// torch SDPA on the prefill shapes: (ms, how GQA ran) keyed by (backend, heads, kv_heads, n).
using SdpaResults = std::map<std::tuple<std::string, int, int, int>, std::pair<double, std::string>>;
SdpaResults run_sdpa() {
  SdpaResults res;
  std::string cmd = "python3 bench/attention_sdpa.py";
  for (const Model& m : kModels)
    for (int n : kPrefillN)
      cmd += " " + std::to_string(m.heads) + ":" + std::to_string(m.kv_heads) + ":" + std::to_string(m.head_dim) + ":" +
             std::to_string(n) + ":" + std::to_string(kPrefillTokens / n);
  cmd += " 2>&1";
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return res;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    int h, hkv, d, n, b;
    double ms, tf;
    char backend[16] = "", how[64] = "";
    if (std::sscanf(line, "sdpa %15s %d %d %d %d %d %lf %lf %63s", backend, &h, &hkv, &d, &n, &b, &ms, &tf, how) == 9)
      res[{backend, h, hkv, n}] = {ms, how};
    else
      std::printf("  (sdpa) %s", line);
  }
  pclose(f);
  return res;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "all";
    cudaDeviceProp prop{};
    NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    g_l2 = size_t(prop.l2CacheSize);
    g_sms = prop.multiProcessorCount;
    if (mode == "one-decode" && argc >= 6) {
      const KVDtype dt = std::string(argv[2]) == "fp16" ? KVDtype::Fp16 : KVDtype::Int4;
      const Model& m = std::string(argv[3]) == "70B" ? kModels[1] : kModels[0];
      const DecodeResult r = bench_decode(m, dt, std::atoi(argv[4]), std::atoi(argv[5]));
      std::printf("one-decode %s %s: %.4f ms, %.0f GB/s, splits %d\n", argv[2], m.name, r.ms,
                  double(r.bytes) / (r.ms * 1e-3) / 1e9, r.splits);
      return 0;
    }
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    std::printf("device: %s, %d SMs, L2 %zu MB, CUDA runtime %d\n", prop.name, g_sms, g_l2 >> 20, rt);

    SdpaResults sdpa;
    if (mode == "all" || mode == "prefill") sdpa = run_sdpa();
    const double copy_gbs = copy_bandwidth();
    std::printf("copy bandwidth (cudaMemcpy D2D 1 GiB, read + write): %.0f GB/s\n\n", copy_gbs);

    if (mode == "decode-splits") return run_decode_splits(copy_gbs);
    if (mode == "all" || mode == "decode") {
      std::printf("### decode (one layer, head_dim 128, page 16; GB/s on the KV bytes read; vs fp16 = fp16 ms / int4 ms)\n\n");
      std::printf("| model | batch | context | int4 splits | int4 ms | int4 GB/s | %% copy BW | fp16 splits | fp16 ms | fp16 GB/s | %% copy BW | int4 vs fp16 |\n");
      std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
      for (const Model& m : kModels)
        for (int batch : {1, 16, 64, 256})
          for (int ctx : {512, 2048, 8192}) {
            const DecodeResult i4 = bench_decode(m, KVDtype::Int4, batch, ctx);
            const DecodeResult f16 = bench_decode(m, KVDtype::Fp16, batch, ctx);
            const double g4 = double(i4.bytes) / (i4.ms * 1e-3) / 1e9, g16 = double(f16.bytes) / (f16.ms * 1e-3) / 1e9;
            std::printf("| %s | %d | %d | %d | %.4f | %.0f | %.0f%% | %d | %.4f | %.0f | %.0f%% | %.2fx |\n", m.name, batch,
                        ctx, i4.splits, i4.ms, g4, 100 * g4 / copy_gbs, f16.splits, f16.ms, g16, 100 * g16 / copy_gbs,
                        f16.ms / i4.ms);
            std::fflush(stdout);
          }
      std::printf("\n");
    }
    if (mode == "all" || mode == "prefill") {
      std::printf("### prefill (causal, %d tokens per batch, TFLOP/s = 2·batch·H·N²·D / time; attention only, the "
                  "cache already written; append = RoPE + K/V into the cache, separately)\n\n",
                  kPrefillTokens);
      std::printf("| model | N | batch | int4 mma.sync ms | TFLOP/s | int4 wgmma ms | TFLOP/s | fp16 mma.sync ms | TFLOP/s | fp16 wgmma ms | TFLOP/s | sdpa flash TFLOP/s | sdpa cuDNN ms | TFLOP/s | fp16 wgmma / cuDNN | int4 wgmma / cuDNN | int4 / fp16 (wgmma) | wgmma / mma.sync (fp16) | append int4 ms | append fp16 ms |\n");
      std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
      std::vector<std::pair<double, double>> wgmma_ms;  // (int4, fp16) per row, for the ping-pong table
      for (const Model& m : kModels)
        for (int n : kPrefillN) {
          const int batch = kPrefillTokens / n;
          const double flops = 2.0 * batch * m.heads * double(n) * n * m.head_dim;
          const PrefillResult i4 = bench_prefill(m, KVDtype::Int4, PrefillPath::MmaSync, n, batch);
          const PrefillResult i4w = bench_prefill(m, KVDtype::Int4, PrefillPath::Wgmma, n, batch);
          const PrefillResult f16 = bench_prefill(m, KVDtype::Fp16, PrefillPath::MmaSync, n, batch);
          const PrefillResult f16w = bench_prefill(m, KVDtype::Fp16, PrefillPath::Wgmma, n, batch);
          wgmma_ms.push_back({i4w.ms, f16w.ms});
          const auto tf = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
          const auto peer_ms = [&](const char* backend) {
            const auto it = sdpa.find({backend, m.heads, m.kv_heads, n});
            return it == sdpa.end() ? 0.0 : it->second.first;
          };
          const double flash = peer_ms("flash"), cudnn = peer_ms("cudnn");
          char fl[32] = "n/a", cd[128] = "n/a | n/a | n/a | n/a";
          if (flash > 0) std::snprintf(fl, sizeof fl, "%.0f", tf(flash));
          if (cudnn > 0)
            std::snprintf(cd, sizeof cd, "%.3f | %.0f | %.2fx | %.2fx", cudnn, tf(cudnn), tf(f16w.ms) / tf(cudnn),
                          tf(i4w.ms) / tf(cudnn));
          std::printf("| %s | %d | %d | %.3f | %.0f | %.3f | %.0f | %.3f | %.0f | %.3f | %.0f | %s | %s | %.2fx | %.2fx | %.3f | %.3f |\n",
                      m.name, n, batch, i4.ms, tf(i4.ms), i4w.ms, tf(i4w.ms), f16.ms, tf(f16.ms), f16w.ms, tf(f16w.ms), fl,
                      cd, f16w.ms / i4w.ms, f16.ms / f16w.ms, i4.append_ms, f16.append_ms);
          std::fflush(stdout);
        }
      // Separately, after the main table: a hang of the untested ping-pong variant loses nothing above.
      std::printf("\n### prefill, wgmma with the consumer warpgroups ping-ponging (same shapes)\n\n");
      std::printf("| model | N | int4 ping-pong ms | TFLOP/s | vs int4 wgmma | fp16 ping-pong ms | TFLOP/s | vs fp16 wgmma |\n");
      std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
      size_t row = 0;
      for (const Model& m : kModels)
        for (int n : kPrefillN) {
          const int batch = kPrefillTokens / n;
          const double flops = 2.0 * batch * m.heads * double(n) * n * m.head_dim;
          const auto tf = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
          const PrefillResult i4 = bench_prefill(m, KVDtype::Int4, PrefillPath::WgmmaPingPong, n, batch);
          const PrefillResult f16 = bench_prefill(m, KVDtype::Fp16, PrefillPath::WgmmaPingPong, n, batch);
          const auto [i4w, f16w] = wgmma_ms[row++];
          std::printf("| %s | %d | %.3f | %.0f | %.2fx | %.3f | %.0f | %.2fx |\n", m.name, n, i4.ms, tf(i4.ms), i4w / i4.ms,
                      f16.ms, tf(f16.ms), f16w / f16.ms);
          std::fflush(stdout);
        }
      std::printf("\nsdpa GQA mode:");
      for (const auto& [key, v] : sdpa)
        std::printf(" %s %d:%d N=%d %s;", std::get<0>(key).c_str(), std::get<1>(key), std::get<2>(key), std::get<3>(key),
                    v.second.c_str());
      std::printf("\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}
