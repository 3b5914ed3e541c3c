// The split plan of attention_decode (host code, no CUDA: the CPU tests check it): how many blocks
// (splits) each (sequence, KV head) pair's cache is divided among, chosen by a cost model of the
// decode kernel, and the workspace that any planned launch can need.
//
// The kernel (attention_decode.cu): a block of 4 warps per (split, KV head, sequence); each warp
// streams every 4th 16-key chunk of the split's range through its own cp.async ring; then the 4
// warps combine in shared memory and, with splits, each block writes G·D fp32 partials and the
// last block of the pair to arrive combines the splits. Predicted time of a launch, in µs:
//
//   waves × (prologue + chunks per warp × chunk time) + combine tail
//
//   prologue      kPrologueUs: the sequence length, then its block table, then the first chunk,
//                 three dependent DRAM round trips before a warp computes anything.
//   chunk time    a warp's chunk when its SM is not saturated (kChunkUs: ~220 instructions with
//                 the MMA chains of one chunk), or the SM's share of DRAM when it is: k resident
//                 blocks of 4 warps move 4k chunks in 4k · chunk bytes / kSmBytesPerUs.
//   waves         ceil(blocks / (SMs × blocks per SM)); k = the blocks of the fullest SM.
//   combine tail  with splits only: L2 round trips of the last block (kRoundTripUs each) — the
//                 arrival (fence, counter), the G · splits log-sum-exps (one pass of loads), then
//                 per thread ceil(G·D/4 / 128) items × ceil(splits / 8) batches of 8 loads.
//
// The constants are fitted to the v9 H200 bench (bench/NOTES-attention.md, "v10"); the plan is the
// argmin over 1..(one wave of resident blocks), ties to fewer splits, so it is deterministic and
// never launches more than one wave with splits (which keeps attention_decode_workspace_bytes an
// upper bound).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace nibble::cuda {

// Splits per sequence: their combine weights fit the decode block's shared memory (G x splits floats).
constexpr int kDecodeMaxSplits = 256;
// (sequence, KV head) pairs with an arrival counter at the start of the workspace (one wave of
// resident blocks never holds more).
constexpr int64_t kDecodeMaxSplitPairs = 8192;
constexpr size_t kDecodeArrivalBytes = size_t(kDecodeMaxSplitPairs) * sizeof(uint32_t);
constexpr int kDecodeWarps = 4;

struct DecodePlanShape {
  int batch = 0, kv_heads = 0, group = 1, head_dim = 128;  // group: query heads per KV head (G)
  int max_seq_len = 0;                                     // the longest sequence (tokens)
  int64_t chunk_bytes = 0;                                 // one 16-token chunk of one KV head
  int sms = 0, blocks_per_sm = 1;                          // the GPU, the form that runs
};

namespace decode_cost {
constexpr double kPrologueUs = 1.5;
constexpr double kChunkUs = 0.6;
constexpr double kSmBytesPerUs = 30.7e3;  // 96% of 4218 GB/s over 132 SMs (v9, 7B b256 ctx 2048)
constexpr double kRoundTripUs = 0.5;
}  // namespace decode_cost

inline int64_t decode_chunks(const DecodePlanShape& s) { return (int64_t(s.max_seq_len) + 15) / 16; }
inline int64_t decode_wave_blocks(const DecodePlanShape& s) { return int64_t(s.sms) * s.blocks_per_sm; }

// The most splits a plan may take: one wave of resident blocks, at most kDecodeMaxSplits and one
// chunk per split.
inline int decode_max_splits(const DecodePlanShape& s) {
  const int64_t pairs = std::max<int64_t>(int64_t(s.batch) * s.kv_heads, 1);
  if (pairs > kDecodeMaxSplitPairs) return 1;
  return int(std::clamp<int64_t>(std::min(decode_wave_blocks(s) / pairs, decode_chunks(s)), 1, kDecodeMaxSplits));
}

// Predicted µs of a launch with `splits` blocks per pair (the model above).
inline double decode_predicted_us(const DecodePlanShape& s, int splits) {
  using namespace decode_cost;
  const int64_t pairs = int64_t(s.batch) * s.kv_heads, blocks = pairs * splits;
  const int64_t per_split = (decode_chunks(s) + splits - 1) / splits;
  const int64_t per_warp = (per_split + kDecodeWarps - 1) / kDecodeWarps;
  const int64_t wave = std::max<int64_t>(decode_wave_blocks(s), 1);
  const auto wave_us = [&](int64_t wave_blocks) {
    const int64_t k = std::min<int64_t>((wave_blocks + s.sms - 1) / s.sms, s.blocks_per_sm);
    const double chunk = std::max(kChunkUs, double(kDecodeWarps * k * s.chunk_bytes) / kSmBytesPerUs);
    return kPrologueUs + double(per_warp) * chunk;
  };
  double us = double(blocks / wave) * wave_us(wave);
  if (blocks % wave) us += wave_us(blocks % wave);
  if (splits > 1) {
    const int64_t items = (int64_t(s.group) * s.head_dim / 4 + 127) / 128;  // float4 outputs per thread
    us += kRoundTripUs * double(3 + items * ((splits + 7) / 8));
  }
  return us;
}

inline int plan_decode_splits(const DecodePlanShape& s) {
  int best = 1;
  double best_us = decode_predicted_us(s, 1);
  for (int n = 2; n <= decode_max_splits(s); ++n) {
    const double us = decode_predicted_us(s, n);
    if (us < best_us) best = n, best_us = us;
  }
  return best;
}

// Workspace bytes of any planned launch for these heads on this GPU, whatever the batch and
// length: planned splits keep pairs · splits within one wave, so the G · pairs · splits partial
// slots (D fp32 + one lse each) are at most G · one wave; the arrival counters go first.
inline size_t decode_workspace_bound(int group, int head_dim, int sms, int blocks_per_sm) {
  return kDecodeArrivalBytes + size_t(group) * size_t(sms) * size_t(blocks_per_sm) * size_t(head_dim + 1) * sizeof(float);
}
// What a launch with `splits` uses.
inline size_t decode_workspace_bytes(int batch, int num_heads, int head_dim, int splits) {
  if (splits <= 1) return 0;
  return kDecodeArrivalBytes + size_t(batch) * size_t(num_heads) * size_t(splits) * size_t(head_dim + 1) * sizeof(float);
}

}  // namespace nibble::cuda
