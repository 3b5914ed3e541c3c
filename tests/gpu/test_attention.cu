// attention_append / attention_prefill / attention_decode over the paged cache, against a float64
// reference on the CPU:
//   - append: the cache rows it writes are format.h's Int4Asym encoding (choose_scale +
//     int_asym_encode) of the (rotated) K and the V rows, bit for bit where the input is exact
//     (V, K stored before RoPE), and within a rounding step where the GPU rotated K in fp32;
//   - decode / prefill: the output against causal GQA softmax attention in float64 over the K/V
//     that the cache holds, read back from the pool and decoded through format.h (INT4) or fp16,
//     rotated on read (float64) when K is stored before RoPE; q rotated in float64 from the input.
// The model's own CPU attention (cpu::attention, BLAS) is not part of the GPU-only build; this
// reference computes the same function (ops.h) in float64. RoPE frequencies: Llama 3.1's llama3
// scaling (theta 500000, factor 8), by cpu::rope_inv_freq's formula in float64.
// The pool is poisoned with 0xFF bytes (NaN fp16 scales/values) before use and the outputs with
// NaN: masked or unwritten elements show. Inputs are fresh random numbers on every run (the run's
// seed is printed; NIBBLE_TEST_SEED replays it).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numbers>
#include <random>

#include "gpu_test_util.h"
#include "nibble/backend/cuda/attention_common.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/kv_cache_paged.h"
#include "nibble/core/half.h"
#include "nibble/quant/format.h"

namespace nibble::cuda {
namespace {

using testing::fresh_seed;
using testing::parallel_for;
using testing::uniform;

// cpu::rope_inv_freq's formula with Llama 3.1's rope_scaling, in float64 (the CPU computes it in fp32, as transformers).
std::vector<double> llama3_inv_freq(int d) {
  const double theta = 500000.0, factor = 8, low = 1, high = 4, old_len = 8192;
  std::vector<double> inv(static_cast<size_t>(d / 2));
  for (int i = 0; i < d / 2; ++i) {
    double f = std::pow(theta, -double(2 * i) / double(d));
    const double wavelen = 2 * std::numbers::pi / f;
    if (wavelen > old_len / low) {
      f = f / factor;
    } else if (wavelen >= old_len / high) {
      const double smooth = (old_len / wavelen - low) / (high - low);
      f = (1 - smooth) * f / factor + smooth * f;
    }
    inv[size_t(i)] = f;
  }
  return inv;
}

// Rotate-half RoPE of one head vector at `pos`, float64 (cpu::apply_rope's math).
void rope_ref(double* x, int d, int64_t pos, const std::vector<double>& inv) {
  for (int i = 0; i < d / 2; ++i) {
    const double a = double(pos) * inv[size_t(i)], c = std::cos(a), s = std::sin(a);
    const double x0 = x[i], x1 = x[i + d / 2];
    x[i] = x0 * c - x1 * s;
    x[i + d / 2] = x1 * c + x0 * s;
  }
}

struct Shape {
  int hkv, g, d;
  int page = 16;
  int heads() const { return hkv * g; }
};

// One cache + its sequences, filled through attention_append with random fp16 Q/K/V.
struct Harness {
  Shape sh;
  KVDtype dtype;
  bool k_before_rope;
  PagedKVLayout layout;
  std::unique_ptr<PagedKVCache> cache;
  std::vector<double> inv;
  std::unique_ptr<RopeTable> rope;
  AttentionBatchBuilder builder;
  AttentionWorkspace ws;
  std::vector<SeqId> seqs;
  std::vector<std::vector<uint16_t>> qkv;  // per sequence: [len][(H + 2 Hkv) D] fp16 bits, all tokens
  uint64_t seed;

  Harness(Shape s, KVDtype dt, bool kbr, int64_t pages, int max_pos)
      : sh(s), dtype(dt), k_before_rope(kbr), layout{2, s.hkv, s.d, s.page, dt}, seed(fresh_seed()) {
    cache = std::make_unique<PagedKVCache>(layout, pages);
    NIBBLE_CUDA_CHECK(cudaMemset(cache->view().pool, 0xFF, size_t(cache->pool_bytes())));
    inv = llama3_inv_freq(s.d);
    rope = std::make_unique<RopeTable>(inv, max_pos);
  }
  int64_t row_elems() const { return int64_t(sh.heads() + 2 * sh.hkv) * sh.d; }

  // Appends n[i] random tokens to sequence i (creating it if needed), runs attention_append on
  // layer 1, returns the batch metadata and the device rotated Q ([tokens][H][D]).
  AttentionBatch append(const std::vector<int>& n, __half** q_rot, float clip = 1.0f) {
    while (seqs.size() < n.size()) {
      seqs.push_back(cache->add_sequence());
      qkv.emplace_back();
    }
    int64_t total = 0;
    for (size_t i = 0; i < n.size(); ++i) {
      EXPECT_TRUE(cache->append(seqs[i], n[i]));
      total += n[i];
    }
    std::vector<uint16_t> host(size_t(total * row_elems()));
    int64_t off = 0;
    for (size_t i = 0; i < n.size(); ++i) {
      const int64_t first = int64_t(qkv[i].size()) / row_elems();
      for (int64_t tkn = 0; tkn < n[i]; ++tkn)
        for (int64_t e = 0; e < row_elems(); ++e) {
          const int64_t head = e / sh.d, dim = e % sh.d;
          float range = head < sh.heads() ? 3.0f : 1.0f;  // q a bit larger: peakier softmax
          if (dim % 16 == 5) range *= 4;                  // a few outlier channels
          const uint64_t idx = (uint64_t(i) << 40) ^ uint64_t((first + tkn) * row_elems() + e);
          host[size_t((off + tkn) * row_elems() + e)] = float_to_fp16(range * uniform(seed, idx));
        }
      qkv[i].insert(qkv[i].end(), host.begin() + off * row_elems(), host.begin() + (off + n[i]) * row_elems());
      off += n[i];
    }
    AttentionBatch b = builder.build(cache->allocator(), seqs, n, nullptr);
    __half* d_qkv = nullptr;
    NIBBLE_CUDA_CHECK(cudaMalloc(&d_qkv, std::max<size_t>(host.size(), 1) * 2));
    NIBBLE_CUDA_CHECK(cudaMemcpy(d_qkv, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    NIBBLE_CUDA_CHECK(cudaMalloc(q_rot, std::max<size_t>(size_t(total) * sh.heads() * sh.d, 1) * 2));
    AppendArgs a;
    a.qkv = d_qkv;
    a.qkv_stride = row_elems();
    a.num_heads = sh.heads();
    a.layer = 1;
    a.rope = rope.get();
    a.k_before_rope = k_before_rope;
    a.clip = clip;
    a.q_out = *q_rot;
    attention_append(cache->view(), b, a, nullptr);
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
    cudaFree(d_qkv);
    return b;
  }

  float input(size_t seq, int64_t pos, int64_t head, int64_t dim) const {
    return fp16_to_float(qkv[seq][size_t(pos * row_elems() + head * sh.d + dim)]);
  }

  // K and V of layer 1 as the cache holds them, decoded through format.h (or fp16), [len][hkv][d].
  struct KV {
    std::vector<double> k, v;
    std::vector<uint8_t> kc, vc;  // INT4 codes (natural dim order)
    std::vector<float> ks, vs;
    std::vector<uint8_t> kz, vz;
  };
  KV read_back(size_t seq, const std::vector<uint8_t>& pool) const {
    const int64_t len = cache->length(seqs[seq]);
    const auto& table = cache->allocator().block_table(seqs[seq]);
    const int D = sh.d, P = sh.page;
    KV r;
    r.k.resize(size_t(len * sh.hkv * D));
    r.v.resize(r.k.size());
    r.kc.resize(r.k.size());
    r.vc.resize(r.k.size());
    r.ks.resize(size_t(len * sh.hkv));
    r.vs.resize(r.ks.size());
    r.kz.resize(r.ks.size());
    r.vz.resize(r.ks.size());
    for (int64_t pos = 0; pos < len; ++pos)
      for (int h = 0; h < sh.hkv; ++h) {
        const uint8_t* blk = pool.data() + block_offset(layout, cache->allocator().num_pages(), 1, table[size_t(pos / P)], h);
        const int64_t row = pos % P, o = (pos * sh.hkv + h) * D;
        if (dtype == KVDtype::Int4) {
          for (int kv = 0; kv < 2; ++kv) {
            uint8_t* codes = (kv ? r.vc : r.kc).data() + o;
            const int rw = int(row);
            unpack_int4_row(blk + (kv ? layout.v_row_offset(rw) : layout.k_row_offset(rw)), D, codes);
            uint16_t sb;
            std::memcpy(&sb, blk + (kv ? layout.v_scale_offset(rw) : layout.k_scale_offset(rw)), 2);
            const uint8_t z = blk[kv ? layout.v_zero_offset(rw) : layout.k_zero_offset(rw)];
            const float scale = fp16_to_float(sb);
            (kv ? r.vs : r.ks)[size_t(pos * sh.hkv + h)] = scale;
            (kv ? r.vz : r.kz)[size_t(pos * sh.hkv + h)] = z;
            const quant::GroupScale gs{scale, 1, z};
            for (int d = 0; d < D; ++d)
              (kv ? r.v : r.k)[size_t(o + d)] = quant::decode_element(quant::Format::Int4Asym, codes[d], gs);
          }
        } else {
          for (int kv = 0; kv < 2; ++kv)
            for (int d = 0; d < D; ++d) {
              uint16_t bits;
              std::memcpy(&bits, blk + (kv ? layout.v_row_offset(int(row)) : layout.k_row_offset(int(row))) + 2 * d, 2);
              (kv ? r.v : r.k)[size_t(o + d)] = fp16_to_float(bits);
            }
        }
      }
    return r;
  }

  std::vector<uint8_t> pool_host() const {
    std::vector<uint8_t> pool(size_t(cache->pool_bytes()));
    NIBBLE_CUDA_CHECK(cudaMemcpy(pool.data(), cache->view().pool, pool.size(), cudaMemcpyDeviceToHost));
    return pool;
  }
};

// Causal attention of query positions [first, first + n) of one sequence against its cached K/V
// (positions 0..pos), float64. out: [n][H][D].
std::vector<double> reference(const Harness& hs, size_t seq, const Harness::KV& kv, int64_t first, int64_t n) {
  const int D = hs.sh.d, H = hs.sh.heads(), G = hs.sh.g, Hkv = hs.sh.hkv;
  const int64_t len = first + n;
  std::vector<double> k = kv.k;
  if (hs.k_before_rope)
    for (int64_t pos = 0; pos < len; ++pos)
      for (int h = 0; h < Hkv; ++h) rope_ref(&k[size_t((pos * Hkv + h) * D)], D, pos, hs.inv);
  std::vector<double> out(static_cast<size_t>(n * H * D));
  parallel_for(n * H, [&](int64_t idx) {
    const int64_t i = idx / H, h = idx % H, pos = first + i;
    std::vector<double> q(static_cast<size_t>(D)), p(size_t(pos + 1));
    for (int d = 0; d < D; ++d) q[size_t(d)] = hs.input(seq, pos, h, d);
    rope_ref(q.data(), D, pos, hs.inv);
    double mx = -INFINITY;
    for (int64_t j = 0; j <= pos; ++j) {
      const double* kj = &k[size_t((j * Hkv + h / G) * D)];
      double s = 0;
      for (int d = 0; d < D; ++d) s += q[size_t(d)] * kj[d];
      p[size_t(j)] = s / std::sqrt(double(D));
      mx = std::max(mx, p[size_t(j)]);
    }
    double sum = 0;
    for (auto& x : p) sum += (x = std::exp(x - mx));
    double* o = &out[size_t(idx * D)];
    for (int d = 0; d < D; ++d) o[d] = 0;
    for (int64_t j = 0; j <= pos; ++j) {
      const double* vj = &kv.v[size_t((j * Hkv + h / G) * D)];
      for (int d = 0; d < D; ++d) o[d] += p[size_t(j)] / sum * vj[d];
    }
  });
  return out;
}

struct ErrStats {
  double sq_err = 0, sq_ref = 0, max_rel = 0;
  int64_t bad = 0, count = 0;
  void add(double got, double ref, double rms_hint) {
    ++count;
    if (!std::isfinite(got)) {
      ++bad;
      return;
    }
    sq_err += (got - ref) * (got - ref);
    sq_ref += ref * ref;
    max_rel = std::max(max_rel, std::fabs(got - ref) / (std::fabs(ref) + rms_hint));
  }
  double rel() const { return std::sqrt(sq_err / std::max(sq_ref, 1e-300)); }
};

std::vector<uint16_t> download_half(const __half* d, size_t n) {
  std::vector<uint16_t> h(n);
  NIBBLE_CUDA_CHECK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
  return h;
}

__half* alloc_poisoned(size_t n) {
  __half* p = nullptr;
  NIBBLE_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * 2));
  NIBBLE_CUDA_CHECK(cudaMemset(p, 0xFF, std::max<size_t>(n, 1) * 2));  // fp16 NaN
  return p;
}

// ---- append: the cache rows are format.h's encoding -------------------------------------------

// Half an fp16 ulp at |v| (10 mantissa bits, subnormals below 2^-14).
double fp16_half_ulp(double v) {
  const int e = std::max(v == 0 ? -14 : int(std::floor(std::log2(std::fabs(v)))), -14);
  return std::ldexp(0.5, e - 10);
}

TEST(AttentionAppend, CacheRowsAreFormatEncoding) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Int4, KVDtype::Fp16})
    for (bool kbr : {false, true})
      for (int D : {64, 128}) {
        SCOPED_TRACE(::testing::Message() << kv_dtype_name(dt) << " D=" << D << " k_before_rope=" << kbr);
        const Shape sh{4, 2, D, 32};
        Harness hs(sh, dt, kbr, 64, 512);
        std::printf("append %s D=%d k_before_rope=%d: seed %llu\n", kv_dtype_name(dt), D, int(kbr),
                    (unsigned long long)hs.seed);
        const float clip = dt == KVDtype::Int4 ? 0.95f : 1.0f;
        const quant::FormatSpec spec{quant::Format::Int4Asym, D, 1, clip};
        int64_t exact_rows = 0, rows = 0, code_diff = 0, codes = 0, q_bad = 0, k_bad = 0;
        double k_err = 0;
        // Q of the tokens this append wrote (positions [first, first + n) of each sequence), rotated.
        auto check_q = [&](const __half* q_rot, const std::vector<int>& n, const std::vector<int64_t>& first) {
          int64_t total = 0;
          for (int x : n) total += x;
          const std::vector<uint16_t> qh = download_half(q_rot, size_t(total) * sh.heads() * D);
          int64_t tok = 0;
          for (size_t s = 0; s < n.size(); ++s)
            for (int64_t pos = first[s]; pos < first[s] + n[s]; ++pos, ++tok)
              for (int h = 0; h < sh.heads(); ++h) {
                std::vector<double> q(static_cast<size_t>(D));
                for (int d = 0; d < D; ++d) q[size_t(d)] = hs.input(s, pos, h, d);
                rope_ref(q.data(), D, pos, hs.inv);
                for (int d = 0; d < D; ++d)
                  if (std::fabs(fp16_to_float(qh[size_t((tok * sh.heads() + h) * D + d)]) - q[size_t(d)]) >
                      1e-3 * (std::fabs(q[size_t(d)]) + 1e-2))
                    ++q_bad;
              }
        };
        // Every cached row of every sequence, the earlier appends' included.
        auto check_cache = [&] {
          const auto pool = hs.pool_host();
          for (size_t s = 0; s < hs.seqs.size(); ++s) {
            const auto kv = hs.read_back(s, pool);
            for (int64_t pos = 0; pos < hs.cache->length(hs.seqs[s]); ++pos)
              for (int h = 0; h < sh.hkv; ++h)
                for (int kvi = 0; kvi < 2; ++kvi) {
                  const int head = sh.heads() + kvi * sh.hkv + h;
                  std::vector<double> x(static_cast<size_t>(D));
                  for (int d = 0; d < D; ++d) x[size_t(d)] = hs.input(s, pos, head, d);
                  const bool rotated = kvi == 0 && !kbr;
                  if (rotated) rope_ref(x.data(), D, pos, hs.inv);
                  const int64_t o = (pos * sh.hkv + h) * D;
                  ++rows;
                  if (dt == KVDtype::Fp16) {
                    const auto& got = kvi ? kv.v : kv.k;
                    bool exact = true;
                    for (int d = 0; d < D; ++d) {
                      const double want = round_fp16(float(x[size_t(d)]));
                      if (got[size_t(o + d)] != want) exact = false;
                      if (!rotated) continue;
                      // The GPU rotates in fp32 (cos/sin rounded to fp32, two products and a sum: at most
                      // 3 roundings of terms up to |x0| + |x1|; 4 with margin), then rounds to fp16.
                      const double pair = hs.input(s, pos, head, d < D / 2 ? d + D / 2 : d - D / 2);
                      const double e = 4 * 0x1p-24 * (std::fabs(hs.input(s, pos, head, d)) + std::fabs(pair));
                      const double err = std::fabs(got[size_t(o + d)] - x[size_t(d)]);
                      k_err = std::max(k_err, err / (fp16_half_ulp(std::fabs(x[size_t(d)]) + e) + e));
                      if (!(err <= fp16_half_ulp(std::fabs(x[size_t(d)]) + e) + e)) ++k_bad;
                    }
                    exact_rows += exact;
                    if (!rotated) EXPECT_TRUE(exact) << "fp16 row not the input, seed " << hs.seed;
                  } else {
                    std::vector<float> xf(static_cast<size_t>(D));
                    for (int d = 0; d < D; ++d) xf[size_t(d)] = float(x[size_t(d)]);
                    std::vector<uint8_t> want(static_cast<size_t>(D));
                    const quant::GroupScale g = quant::encode_group(spec, xf.data(), D, want.data());
                    const auto& got = kvi ? kv.vc : kv.kc;
                    const float gs = (kvi ? kv.vs : kv.ks)[size_t(pos * sh.hkv + h)];
                    const uint8_t gz = (kvi ? kv.vz : kv.kz)[size_t(pos * sh.hkv + h)];
                    bool exact = gs == g.scale && gz == g.zero;
                    for (int d = 0; d < D; ++d) {
                      ++codes;
                      if (got[size_t(o + d)] != want[size_t(d)]) {
                        exact = false;
                        ++code_diff;
                        EXPECT_LE(std::abs(int(got[size_t(o + d)]) - int(want[size_t(d)])), 1) << "seed " << hs.seed;
                      }
                    }
                    exact_rows += exact;
                    if (!rotated) {
                      // Exact fp16 input: bit for bit format.h.
                      EXPECT_TRUE(exact) << "row (seq " << s << ", pos " << pos << ", head " << h << ", "
                                         << (kvi ? "V" : "K") << ") differs from format.h, seed " << hs.seed;
                    } else {
                      EXPECT_NEAR(gs, g.scale, 2e-3 * g.scale + 1e-7) << "seed " << hs.seed;
                    }
                  }
                }
          }
        };
        // A first append creates the sequences, a second continues them (positions past the first).
        const std::vector<std::vector<int>> appends = {{37, 1, 200}, {3, 16, 1}};
        std::vector<int64_t> first(3, 0);
        for (const auto& n : appends) {
          __half* q_rot = nullptr;
          hs.append(n, &q_rot, clip);
          check_q(q_rot, n, first);
          cudaFree(q_rot);
          for (size_t s = 0; s < n.size(); ++s) first[s] += n[s];
          check_cache();
        }
        std::printf("append %s D=%d k_before_rope=%d: %lld/%lld rows bit-exact, %lld/%lld codes off by one "
                    "(rotated K: fp32 RoPE on the GPU vs float64 here), fp16 rotated K: worst error / bound %.2f, "
                    "%lld over; q mismatches %lld\n",
                    kv_dtype_name(dt), D, int(kbr), (long long)exact_rows, (long long)rows, (long long)code_diff,
                    (long long)codes, k_err, (long long)k_bad, (long long)q_bad);
        if (dt == KVDtype::Int4) EXPECT_LT(double(code_diff), 2e-3 * double(codes) + 1);
        EXPECT_EQ(k_bad, 0) << "seed " << hs.seed;
        EXPECT_EQ(q_bad, 0) << "seed " << hs.seed;
      }
}

// ---- decode ----------------------------------------------------------------------------------

struct DecodeCase {
  int batch, min_ctx, max_ctx;
  Shape sh;
};

void run_decode(const DecodeCase& c, KVDtype dt, bool kbr, int forced_splits) {
  const int D = c.sh.d, H = c.sh.heads();
  std::mt19937_64 rng(fresh_seed());
  std::vector<int> ctx(static_cast<size_t>(c.batch));
  int64_t pages = 0;
  for (auto& x : ctx) {
    x = c.min_ctx + int(rng() % uint64_t(c.max_ctx - c.min_ctx + 1));
    pages += (x + c.sh.page - 1) / c.sh.page;
  }
  ctx[0] = c.max_ctx;
  pages += (c.max_ctx + c.sh.page - 1) / c.sh.page + 8;
  Harness hs(c.sh, dt, kbr, pages, c.max_ctx + 1);
  // History (all but the last token) in one append; then the decode step's own token.
  std::vector<int> hist(ctx.size()), ones(ctx.size(), 1);
  for (size_t i = 0; i < ctx.size(); ++i) hist[i] = ctx[i] - 1;
  __half* q0 = nullptr;
  hs.append(hist, &q0);
  __half* q = nullptr;
  const AttentionBatch b = hs.append(ones, &q);
  __half* out = alloc_poisoned(size_t(c.batch) * H * D);
  AttentionArgs a;
  a.q = q;
  a.out = out;
  a.num_heads = H;
  a.layer = 1;
  a.rope = hs.rope.get();
  a.k_before_rope = kbr;
  a.num_splits = forced_splits;
  attention_decode(hs.cache->view(), b, a, hs.ws, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = download_half(out, size_t(c.batch) * H * D);
  // Again on the same workspace into a poisoned output: bit for bit the same (the splits' arrival
  // counters are back at zero, whichever split block combined).
  NIBBLE_CUDA_CHECK(cudaMemset(out, 0xFF, got.size() * 2));
  attention_decode(hs.cache->view(), b, a, hs.ws, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(download_half(out, got.size()) == got) << "second launch differs, seed " << hs.seed;
  const auto pool = hs.pool_host();
  ErrStats st;
  for (int s = 0; s < c.batch; ++s) {
    const auto kv = hs.read_back(size_t(s), pool);
    const auto ref = reference(hs, size_t(s), kv, ctx[size_t(s)] - 1, 1);
    double rms = 0;
    for (double x : ref) rms += x * x;
    rms = std::sqrt(rms / double(ref.size()));
    for (int64_t i = 0; i < H * D; ++i) st.add(fp16_to_float(got[size_t(s * H * D + i)]), ref[size_t(i)], rms);
  }
  const int splits = forced_splits ? forced_splits : attention_decode_splits(hs.cache->view(), b, H, kbr);
  std::printf("decode %s kbr=%d B=%d ctx %d..%d Hkv=%d G=%d D=%d page=%d splits=%d: rel err %.2e, max err/(|ref|+rms) "
              "%.2e, non-finite %lld / %lld\n",
              kv_dtype_name(dt), int(kbr), c.batch, c.min_ctx, c.max_ctx, c.sh.hkv, c.sh.g, D, c.sh.page, splits,
              st.rel(), st.max_rel, (long long)st.bad, (long long)st.count);
  EXPECT_EQ(st.bad, 0) << "seed " << hs.seed;
  EXPECT_LT(st.rel(), 4e-3) << "seed " << hs.seed;
  EXPECT_LT(st.max_rel, 5e-2) << "seed " << hs.seed;
  cudaFree(q0);
  cudaFree(q);
  cudaFree(out);
}

const DecodeCase kDecodeCases[] = {
    {1, 1, 1, {8, 1, 128}},          {1, 8192, 8192, {8, 4, 128}},  {3, 1, 40, {4, 8, 128}},
    {17, 100, 1000, {2, 4, 64}},     {128, 1, 300, {2, 8, 128}},    {5, 2000, 5000, {4, 1, 128}},
    {64, 500, 700, {1, 16, 64}},     {2, 777, 3333, {8, 8, 64, 32}}, {9, 1, 130, {4, 4, 128, 64}},
    // G 2 and 3: the transposed INT4 form's columns (two heads a lane) only partly filled
    {4, 1, 2100, {3, 2, 128}},       {3, 200, 1300, {2, 3, 64, 32}},
};

TEST(AttentionDecode, Int4KAfterRope) {
  NIBBLE_REQUIRE_GPU();
  for (const auto& c : kDecodeCases) run_decode(c, KVDtype::Int4, false, 0);
}
TEST(AttentionDecode, Fp16KAfterRope) {
  NIBBLE_REQUIRE_GPU();
  for (const auto& c : kDecodeCases) run_decode(c, KVDtype::Fp16, false, 0);
}
TEST(AttentionDecode, KBeforeRopeRotatedOnRead) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Int4, KVDtype::Fp16}) {
    run_decode({4, 1, 900, {4, 4, 128}}, dt, true, 0);
    run_decode({2, 3000, 4100, {2, 8, 64}}, dt, true, 0);
  }
}
// The splits the plan picks on this GPU for Llama-2-70B (64 query / 8 KV heads) at batch 1 and 16,
// context 2048 and 8192, run (forced) on 2 sequences of 2 KV heads, at those contexts and at a
// context that is no multiple of the page.
TEST(AttentionDecode, SeventyBPlannedSplits) {
  NIBBLE_REQUIRE_GPU();
  KVCacheView view;
  view.kv_heads = 8;
  view.head_dim = 128;
  view.dtype = KVDtype::Int4;
  std::vector<int> splits;
  for (int batch : {1, 16})
    for (int ctx : {2048, 8192}) {
      AttentionBatch b;
      b.batch = batch;
      b.num_tokens = batch;
      b.max_seq_len = ctx;
      splits.push_back(attention_decode_splits(view, b, 64));
    }
  std::sort(splits.begin(), splits.end());
  splits.erase(std::unique(splits.begin(), splits.end()), splits.end());
  for (int s : splits) {
    run_decode({2, 2048, 2048, {2, 8, 128}}, KVDtype::Int4, false, s);
    run_decode({2, 1900, 2100, {2, 8, 128}}, KVDtype::Int4, false, s);
  }
  run_decode({2, 8192, 8192, {2, 8, 128}}, KVDtype::Int4, false, splits.back());
}

TEST(AttentionDecode, ForcedSplitsAgree) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Int4, KVDtype::Fp16})
    for (int s : {1, 2, 7, 64}) run_decode({6, 1, 1500, {4, 4, 128}}, dt, false, s);
}

// ---- prefill ---------------------------------------------------------------------------------

// The prefill kernels that cover a harness's cache: the mma.sync kernel always, the wgmma one
// where it applies, and its ping-pong variant when asked for (its own test, the file's last: a
// hang there cannot hide the other results).
std::vector<PrefillPath> prefill_paths(const Harness& hs, bool pingpong) {
  std::vector<PrefillPath> paths{PrefillPath::MmaSync};
  if (prefill_wgmma_applies(hs.cache->view(), hs.k_before_rope)) {
    paths.push_back(PrefillPath::Wgmma);
    if (pingpong) paths.push_back(PrefillPath::WgmmaPingPong);
  }
  return paths;
}

// Where an output goes wrong first (element order: sequence, token, head, dim), and how many rows
// (token x head) hold a bad element: one device run tells a layout bug from a masking one.
struct FirstBad {
  int64_t elems = 0, rows = 0;
  bool found = false;
  size_t seq = 0;
  int64_t pos = 0, head = 0, dim = 0;
  double got = 0, ref = 0;
  std::vector<int64_t> by_dim8;  // bad elements per group of 8 dims (a 16-byte piece)
  void add(size_t s, int64_t p, int64_t h, int64_t d, double x, double y, bool new_row) {
    ++elems;
    rows += new_row;
    if (by_dim8.size() <= size_t(d / 8)) by_dim8.resize(size_t(d / 8) + 1);
    ++by_dim8[size_t(d / 8)];
    if (found) return;
    found = true;
    seq = s, pos = p, head = h, dim = d, got = x, ref = y;
  }
  void print(const char* what) const {
    if (!found) return;
    std::printf("  %s: %lld bad elements in %lld rows; first: seq %zu pos %lld head %lld dim %lld got %.6g ref %.6g; "
                "by dims/8:",
                what, (long long)elems, (long long)rows, seq, (long long)pos, (long long)head, (long long)dim, got, ref);
    for (int64_t n : by_dim8) std::printf(" %lld", (long long)n);
    std::printf("\n");
  }
};

// Sequences get `context` tokens in a first chunk (appended and prefilled), then `fresh` tokens
// whose prefill output is checked (chunked prefill when context > 0). Every prefill path that
// applies runs on the same inputs into its own poisoned outputs; each is checked against the
// float64 reference, and the paths against each other.
void run_prefill(const std::vector<int>& context, const std::vector<int>& fresh, Shape sh, KVDtype dt, bool kbr,
                 bool pingpong = false) {
  const int D = sh.d, H = sh.heads();
  int64_t pages = 8, max_len = 1;
  for (size_t i = 0; i < fresh.size(); ++i) {
    pages += (context[i] + fresh[i] + sh.page - 1) / sh.page + 1;
    max_len = std::max<int64_t>(max_len, context[i] + fresh[i]);
  }
  Harness hs(sh, dt, kbr, pages, int(max_len));
  const std::vector<PrefillPath> paths = prefill_paths(hs, pingpong);
  // Flushed before the kernels run: if one hangs and the timeout kills the program, the last line
  // names the case.
  std::printf("prefill case: %s kbr=%d seqs=%zu Hkv=%d G=%d D=%d page=%d, %zu path(s)\n", kv_dtype_name(dt), int(kbr),
              fresh.size(), sh.hkv, sh.g, D, sh.page, paths.size());
  std::fflush(stdout);
  AttentionArgs a;
  a.num_heads = H;
  a.layer = 1;
  a.rope = hs.rope.get();
  a.k_before_rope = kbr;
  int64_t ctx_tokens = 0, new_tokens = 0;
  for (size_t i = 0; i < fresh.size(); ++i) {
    ctx_tokens += context[i];
    new_tokens += fresh[i];
  }
  // Chunk c's outputs of every path, [path][token][H][D]; a batch's metadata lives until the next
  // append, so each chunk runs on every path before the next is appended.
  std::vector<__half*> q(2, nullptr), outs;
  const auto run_chunk = [&](int chunk, const std::vector<int>& n, int64_t tokens) {
    const AttentionBatch b = hs.append(n, &q[size_t(chunk)]);
    for (PrefillPath path : paths) {
      outs.push_back(alloc_poisoned(size_t(tokens) * H * D));
      a.q = q[size_t(chunk)];
      a.out = outs.back();
      a.prefill_path = path;
      attention_prefill(hs.cache->view(), b, a, nullptr);
    }
  };
  run_chunk(0, context, ctx_tokens);
  run_chunk(1, fresh, new_tokens);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  const auto pool = hs.pool_host();
  // Reference of every checked token, in output order: chunk 0's tokens, then chunk 1's.
  std::vector<std::vector<double>> ref(2);
  std::vector<double> rms(fresh.size());
  for (size_t s = 0; s < fresh.size(); ++s) {
    const auto kv = hs.read_back(s, pool);
    for (int chunk = 0; chunk < 2; ++chunk) {
      const int64_t first = chunk ? context[s] : 0, n = chunk ? fresh[s] : context[s];
      if (n == 0) continue;
      const auto r = reference(hs, s, kv, first, n);
      ref[size_t(chunk)].insert(ref[size_t(chunk)].end(), r.begin(), r.end());
      double sq = 0;
      for (double x : r) sq += x * x;
      rms[s] = std::max(rms[s], std::sqrt(sq / double(r.size())));
    }
  }
  std::vector<std::vector<uint16_t>> got(2 * paths.size());  // [chunk][path]
  for (size_t i = 0; i < got.size(); ++i)
    got[i] = download_half(outs[i], size_t(i < paths.size() ? ctx_tokens : new_tokens) * H * D);
  const double kMaxRel = 5e-2;
  for (size_t k = 0; k < paths.size(); ++k) {
    ErrStats st, vs_first;
    FirstBad bad, differs;
    for (int chunk = 0; chunk < 2; ++chunk) {
      const auto& g = got[size_t(chunk) * paths.size() + k];
      const auto& g0 = got[size_t(chunk) * paths.size()];
      int64_t row = 0;  // token of this chunk's output
      for (size_t s = 0; s < fresh.size(); ++s) {
        const int64_t first = chunk ? context[s] : 0, n = chunk ? fresh[s] : context[s];
        for (int64_t i = 0; i < n; ++i, ++row)
          for (int h = 0; h < H; ++h) {
            bool row_bad = false, row_differs = false;
            for (int d = 0; d < D; ++d) {
              const size_t e = size_t((row * H + h) * D + d);
              const double x = fp16_to_float(g[e]), r = ref[size_t(chunk)][e], x0 = fp16_to_float(g0[e]);
              st.add(x, r, rms[s]);
              vs_first.add(x, x0, rms[s]);
              const auto note = [&](FirstBad& fb, bool& flagged, double y) {
                if (std::isfinite(x) && std::fabs(x - y) <= kMaxRel * (std::fabs(y) + rms[s])) return;
                fb.add(s, first + i, h, d, x, y, !flagged);
                flagged = true;
              };
              note(bad, row_bad, r);
              note(differs, row_differs, x0);
            }
          }
      }
    }
    std::printf("prefill %s %s kbr=%d seqs=%zu new tokens %lld (+%lld context) Hkv=%d G=%d D=%d page=%d: rel err %.2e, "
                "max err/(|ref|+rms) %.2e, non-finite %lld / %lld",
                prefill_path_name(paths[k]), kv_dtype_name(dt), int(kbr), fresh.size(), (long long)new_tokens,
                (long long)ctx_tokens, sh.hkv, sh.g, D, sh.page, st.rel(), st.max_rel, (long long)st.bad,
                (long long)st.count);
    if (k > 0) std::printf("; vs %s: rel diff %.2e, max %.2e", prefill_path_name(paths[0]), vs_first.rel(), vs_first.max_rel);
    std::printf("\n");
    bad.print("against the reference");
    if (k > 0) differs.print("against the first path");
    std::fflush(stdout);
    EXPECT_EQ(st.bad, 0) << prefill_path_name(paths[k]) << ", seed " << hs.seed;
    EXPECT_LT(st.rel(), 4e-3) << prefill_path_name(paths[k]) << ", seed " << hs.seed;
    EXPECT_LT(st.max_rel, kMaxRel) << prefill_path_name(paths[k]) << ", seed " << hs.seed;
    if (k > 0) {
      EXPECT_LT(vs_first.rel(), 4e-3) << prefill_path_name(paths[k]) << " vs " << prefill_path_name(paths[0]);
      EXPECT_LT(vs_first.max_rel, kMaxRel) << prefill_path_name(paths[k]) << " vs " << prefill_path_name(paths[0]);
    }
  }
  for (__half* p : q) cudaFree(p);
  for (__half* p : outs) cudaFree(p);
}

TEST(AttentionPrefill, RaggedBatchAndChunkedContinuation) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Int4, KVDtype::Fp16}) {
    run_prefill({0, 0, 0, 0, 0}, {1, 17, 64, 65, 200}, {4, 4, 128}, dt, false);
    run_prefill({33, 100, 0, 1, 64}, {1, 150, 70, 63, 64}, {2, 8, 128}, dt, false);
    run_prefill({0, 500}, {1000, 300}, {8, 1, 64}, dt, false);
    run_prefill({17, 0}, {129, 5}, {1, 16, 128, 32}, dt, false);
    run_prefill({0}, {2048}, {2, 2, 128}, dt, false);
  }
}
// The wgmma kernel's own edges (it runs wherever it applies above too): GQA 1 with pages of 64,
// tiles of 128 keys against contexts that are not multiples of them, blocks whose second
// warpgroup has no valid row (<= 64 new tokens), a long chunked continuation, and those edges in
// more work items (tile, head) than an H200 has SMs (320: its persistent blocks take several, the
// K/V rings running on from one to the next, at odd and even ring positions).
TEST(AttentionPrefill, WgmmaEdgesAgainstMmaSync) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Fp16, KVDtype::Int4}) {
    run_prefill({0, 300, 129, 0}, {257, 128, 1000, 64}, {4, 1, 128, 64}, dt, false);
    run_prefill({127, 128, 1, 4000}, {1, 2, 63, 333}, {2, 4, 128, 256}, dt, false);
    run_prefill({0}, {4096}, {1, 8, 128}, dt, false);
    run_prefill({127, 1, 300}, {1, 63, 333}, {2, 32, 128, 64}, dt, false);
  }
}
TEST(AttentionPrefill, KBeforeRopeRotatedOnRead) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Int4, KVDtype::Fp16}) {
    run_prefill({40, 0}, {90, 130}, {2, 4, 128}, dt, true);
    run_prefill({0, 100}, {77, 64}, {4, 2, 64, 64}, dt, true);
  }
}

// The ping-pong variant on the wgmma cases (last in the file).
TEST(AttentionPrefill, WgmmaPingPong) {
  NIBBLE_REQUIRE_GPU();
  for (KVDtype dt : {KVDtype::Fp16, KVDtype::Int4}) {
    run_prefill({0, 0, 0, 0, 0}, {1, 17, 64, 65, 200}, {4, 4, 128}, dt, false, true);
    run_prefill({33, 100, 0, 1, 64}, {1, 150, 70, 63, 64}, {2, 8, 128}, dt, false, true);
    run_prefill({127, 128, 1, 4000}, {1, 2, 63, 333}, {2, 4, 128, 256}, dt, false, true);
    run_prefill({0}, {2048}, {2, 2, 128}, dt, false, true);
    run_prefill({127, 1, 300}, {1, 63, 333}, {2, 32, 128, 64}, dt, false, true);
  }
}

}  // namespace
}  // namespace nibble::cuda
