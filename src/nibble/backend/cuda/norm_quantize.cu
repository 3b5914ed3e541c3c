#include "nibble/backend/cuda/norm_quantize.h"

#include <algorithm>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/format_device.cuh"
#include "nibble/backend/cuda/hadamard_device.cuh"
#include "nibble/core/error.h"

namespace nibble::cuda {

namespace {

enum Mode { kNorm, kGather, kSwiglu };

struct ActParams {
  const __half* a;  // h, a or gate
  const __half* u;  // up (swiglu)
  int64_t ld;
  const int32_t* perm;
  const float* norm_w;
  float eps;
  ActQuant q;
  uint8_t* out_q;
  __half* out_s;
  AtomShape shape;
};

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kMaxSmem = 200 * 1024;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int MODE>
__global__ void __launch_bounds__(kThreads) act_quant_kernel(ActParams p) {
  extern __shared__ float vals[];  // the row's K values, input channel order
  __shared__ float red[kWarps];
  const AtomShape& sh = p.shape;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int slabs = sh.slabs();
  uint8_t* q_tile = p.out_q + size_t(row / kRowTile) * slabs * kSlabBytes + (row % kRowTile) * 64;

  if (row >= sh.rows) {  // padding row: code 0, scale 0 (written by the row's first block)
    if (blockIdx.y != 0) return;
    for (int c = tid; c < slabs * 4; c += kThreads)
      *reinterpret_cast<uint4*>(q_tile + size_t(c / 4) * kSlabBytes + (c % 4) * 16) = make_uint4(0, 0, 0, 0);
    for (int gi = tid; gi < sh.groups(); gi += kThreads) p.out_s[size_t(gi) * sh.rows_pad + row] = __float2half_rn(0.f);
    return;
  }

  // 1. The row into shared memory as fp32 (sum of squares on the way for the norm).
  const int K = sh.K;
  float ss = 0;
  const __half* a = p.a + row * p.ld;
  for (int c = tid; c < K / 8; c += kThreads) {
    const uint4 va = *reinterpret_cast<const uint4*>(a + c * 8);
    const __half2* ha = reinterpret_cast<const __half2*>(&va);
    float v[8];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      v[2 * e] = __low2float(ha[e]);
      v[2 * e + 1] = __high2float(ha[e]);
    }
    if constexpr (MODE == kSwiglu) {
      const uint4 vu = *reinterpret_cast<const uint4*>(p.u + row * p.ld + c * 8);
      const __half2* hu = reinterpret_cast<const __half2*>(&vu);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float g0 = v[2 * e], g1 = v[2 * e + 1];
        v[2 * e] = g0 / (1.0f + expf(-g0)) * __low2float(hu[e]);
        v[2 * e + 1] = g1 / (1.0f + expf(-g1)) * __high2float(hu[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      vals[c * 8 + e] = v[e];
      if constexpr (MODE == kNorm) ss += v[e] * v[e];
    }
  }
  float inv = 1.0f;
  if constexpr (MODE == kNorm) {
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    float tot = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) tot += red[w];
    inv = 1.0f / sqrtf(tot / float(K) + p.eps);  // as cpu::rms_norm
  }
  __syncthreads();

  // The value of output (permuted) channel j.
  const auto value = [&](int j) {
    float v = vals[p.perm ? p.perm[j] : j];
    if constexpr (MODE == kNorm) v = p.norm_w[j] * (v * inv);
    return v;
  };

  // 2. INT4 groups: one warp per group of 128, four channels per lane; the row's groups are shared
  // among its gridDim.y blocks.
  const int s_k = lane / 8, h = (lane / 4) & 1, t = lane & 3;
  for (int gi = blockIdx.y * kWarps + warp; gi < sh.g4; gi += gridDim.y * kWarps) {
    const int j0 = gi * kGroup + lane * 4;
    // Four channels per lane: one 16-byte load of the permutation and one of the norm weight.
    int src[4] = {j0, j0 + 1, j0 + 2, j0 + 3};
    if (p.perm) {
      const int4 pv = __ldg(reinterpret_cast<const int4*>(p.perm + j0));
      src[0] = pv.x, src[1] = pv.y, src[2] = pv.z, src[3] = pv.w;
    }
    float v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = vals[src[i]];
    if constexpr (MODE == kNorm) {
      const float4 wv = __ldg(reinterpret_cast<const float4*>(p.norm_w + j0));
      v[0] = wv.x * (v[0] * inv), v[1] = wv.y * (v[1] * inv), v[2] = wv.z * (v[2] * inv), v[3] = wv.w * (v[3] * inv);
    }
    if (p.q.hadamard) hadamard_blocked4(v, lane);
    float amax = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
    amax = warp_max(amax);
    const float scale = int_sym_scale_device(p.q.clip4, amax, 7);
    const float rcp = scale == 0 ? 0.f : 1.0f / scale;
    uint32_t mine = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      mine |= uint32_t(uint8_t(int_sym_code_rcp(v[i], scale, rcp, 4)) & 0xf) << (8 * i + (h ? 0 : 4));
    const uint32_t w = mine | __shfl_xor_sync(0xffffffffu, mine, 4);
    if (h == 0) *reinterpret_cast<uint32_t*>(q_tile + size_t(gi) * kSlabBytes + t * 16 + s_k * 4) = w;
    if (lane == 0) p.out_s[size_t(gi) * sh.rows_pad + row] = __float2half_rn(scale);
  }

  // 3. Keepers (by the row's last block): one scale over all of them (block reduction), then one
  // warp per group of 128.
  if (sh.g8 > 0 && blockIdx.y == gridDim.y - 1) {
    const int k4 = K - sh.keeper;
    float amax = 0;
    for (int j = k4 + tid; j < K; j += kThreads) amax = fmaxf(amax, fabsf(value(j)));
    amax = warp_max(amax);
    __syncthreads();  // red[] reuse
    if (lane == 0) red[warp] = amax;
    __syncthreads();
    amax = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, red[w]);
    const float scale = int_sym_scale_device(p.q.clip8, amax, 127);
    for (int c = warp; c < sh.g8; c += kWarps) {
      const int half = lane / 16, kk = 4 * (lane % 16);
      const int ks = kk / 32, hh = (kk / 16) & 1, tt = (kk / 4) & 3;
      const int j0 = k4 + c * kGroup + lane * 4;
      uint32_t wd = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) wd |= uint32_t(uint8_t(int_sym_code_fast(value(j0 + i), scale, 8))) << (8 * i);
      *reinterpret_cast<uint32_t*>(q_tile + size_t(sh.g4 + 2 * c + half) * kSlabBytes + tt * 16 + (2 * ks + hh) * 4) =
          wd;
    }
    for (int c = tid; c < sh.g8; c += kThreads) p.out_s[size_t(sh.g4 + c) * sh.rows_pad + row] = __float2half_rn(scale);
  }
}

template <int MODE>
void launch(const ActParams& p, cudaStream_t stream) {
  static bool configured = [] {
    NIBBLE_CUDA_CHECK(cudaFuncSetAttribute(act_quant_kernel<MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem));
    return true;
  }();
  (void)configured;
  const std::string where = "norm_quantize";
  require(size_t(p.shape.K) * 4 <= size_t(kMaxSmem), where, "K = {} is too large", p.shape.K);
  require(p.ld % 8 == 0 && p.ld >= p.shape.K, where, "row stride {} must be a multiple of 8 and >= K", p.ld);
  if (p.shape.rows_pad == 0) return;
  // A few rows (decode) leave most SMs idle with a block per row, and a block's time is then the
  // kernel's: split each row's groups over blocks (each loads the whole row, from L2) until about
  // two blocks per SM are in flight.
  int sms = 0, dev = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&dev));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t by_groups = (p.shape.g4 + kWarps - 1) / kWarps;
  const int64_t by_gpu = (2 * int64_t(sms) + p.shape.rows_pad - 1) / p.shape.rows_pad;
  const dim3 grid(unsigned(p.shape.rows_pad), unsigned(std::clamp<int64_t>(std::min(by_groups, by_gpu), 1, 65535)));
  act_quant_kernel<MODE><<<grid, kThreads, size_t(p.shape.K) * 4, stream>>>(p);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

ActParams make_params(const __half* a, const __half* u, int64_t ld, const int32_t* perm, const float* w, float eps,
                      const AtomOperandMut& out, ActQuant q) {
  ActParams p{};
  p.a = a;
  p.u = u;
  p.ld = ld;
  p.perm = perm;
  p.norm_w = w;
  p.eps = eps;
  p.q = q;
  p.out_q = out.q;
  p.out_s = out.s;
  p.shape = out.shape;
  return p;
}

}  // namespace

void rmsnorm_quantize(const __half* h, int64_t ld_h, const int32_t* perm, const float* norm_w, float eps,
                      const AtomOperandMut& out, ActQuant q, cudaStream_t stream) {
  launch<kNorm>(make_params(h, nullptr, ld_h, perm, norm_w, eps, out, q), stream);
}

void gather_quantize(const __half* a, int64_t ld_a, const int32_t* perm, const AtomOperandMut& out, ActQuant q,
                     cudaStream_t stream) {
  launch<kGather>(make_params(a, nullptr, ld_a, perm, nullptr, 0, out, q), stream);
}

void swiglu_quantize(const __half* gate, const __half* up, int64_t ld, const int32_t* perm,
                     const AtomOperandMut& out, ActQuant q, cudaStream_t stream) {
  launch<kSwiglu>(make_params(gate, up, ld, perm, nullptr, 0, out, q), stream);
}

}  // namespace nibble::cuda
