// The launch plans of gemm_w4a4's wgmma kernels and of its weight-streaming kernel (M <= 16; at the end)
// (host code without CUDA, so the CPU tests check them; the share arithmetic is also compiled into the
// stream-K kernel). The two wgmma kernels run 128 W rows x 128 tokens block tiles, one block per SM, `slabs` K slabs a tile; the unit of every cost below is one
// slab-time, what a block spends on one slab (≈ 1390 clocks ≈ 0.72 µs on the H200 with v9's consumers).
//
// Cluster plan (v9, GemmPath::Wgmma): one block per (tile, cluster rank), K split over a cluster of 1, 2,
// 4 or 8 ranks where the tiles do not fill the SMs, the ranks' sums reduced through distributed shared
// memory. Whole waves only:  cost = waves x (slabs per rank + kFixed + kSpanEnd + kClusterReduce if split).
//
// Stream-K plan (GemmPath::WgmmaStreamK): a persistent grid of `blocks` <= SMs blocks walks the
// flattened (tile, slab) iteration space (tile-major, slabs inner; tiles with the token tile fastest, so
// the token tiles of one W tile are neighbours and W is read from DRAM about once) in contiguous
// shares: block b takes iterations [share_begin(b), share_begin(b + 1)). A share cuts into spans, each
// one stretch of slabs of one tile: whole tiles in the middle, at most a tile's tail first (slabs
// s > 0 on: a *contributor*, it writes its fp32 partial tile to the workspace, slot b, and raises its
// flags) and a tile's head last (slabs 0.. on: the tile's *owner*, it waits for the flags of the
// blocks after it that hold the rest of the tile, adds their partials in block order, and writes the
// output). Every block writes its partial, if any, before it waits for anything, and waits only for
// blocks with a larger index, so with all blocks resident no wait can close a cycle
// (bench/NOTES-gemm_w4a4.md, "Session 15"). The cost is simulated block by block:
//   a block's time  = kFixed + its iterations + kSpanEnd per span (+ kPartialWrite after its partial);
//   an owner's end  = max(its time, its contributors' partial times) + kPartialRead per contributor.
// The plan is the argmin over blocks in [1, min(SMs, iterations)], ties to fewer blocks.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#ifdef __CUDACC__
#define NIBBLE_PLAN_HD __host__ __device__
#else
#define NIBBLE_PLAN_HD
#endif

namespace nibble::cuda {

namespace wgmma_cost {
// v9's fitted model (session 12) put 3 slab-times of fill + epilogue on every wave and 2 on a
// cluster's reduction; stream-K fills its pipeline once and pays the epilogue per span.
constexpr double kFixed = 2.5;         // pipeline fill: the first slab's copies before any MMA
constexpr double kSpanEnd = 0.5;       // a span's last fold (not overlapped) and its epilogue
constexpr double kClusterReduce = 2;   // v9's distributed-shared-memory reduction of a split tile
constexpr double kPartialWrite = 0.5;  // a contributor's 64 KB of fp32 partial + fence + flags
constexpr double kPartialRead = 0.75;  // an owner's read of one 64 KB partial from L2
}  // namespace wgmma_cost

struct WgmmaClusterPlan {
  int cluster = 1, slabs_per_rank = 0;
  double cost = 0;  // slab-times
};

inline WgmmaClusterPlan wgmma_cluster_plan(int64_t tiles, int slabs, int sms) {
  using namespace wgmma_cost;
  WgmmaClusterPlan best{1, slabs, 1e300};
  for (int cluster : {1, 2, 4, 8}) {
    const int per_rank = (slabs + cluster - 1) / cluster;
    if ((cluster - 1) * per_rank >= slabs) break;  // a rank without slabs
    const double waves = double((tiles * cluster + sms - 1) / sms);
    const double cost = waves * (per_rank + kFixed + kSpanEnd + (cluster > 1 ? kClusterReduce : 0));
    if (cost < best.cost) best = {cluster, per_rank, cost};
  }
  return best;
}

// The block tiles of a shape: W tiles of 128 rows x token tiles of 128 of the padded rows (the wgmma
// kernels' grids; gemm_w4a4.cu's kBN, kBM).
constexpr int kWgmmaTile = 128;
NIBBLE_PLAN_HD constexpr int64_t wgmma_tiles(int64_t w_rows_pad, int64_t x_rows_pad) {
  return ((w_rows_pad + kWgmmaTile - 1) / kWgmmaTile) * ((x_rows_pad + kWgmmaTile - 1) / kWgmmaTile);
}

// The order of v9's blocks. The GPU starts a grid's blocks in launch order (x, then y, then z); walking
// every W tile of one token tile first put ~132 distinct W tiles in a wave, so a W larger than L2 (70B
// gate/up and down: 117 MB) was read from DRAM once per token tile (3.8 GB at M = 4096). Block b takes
// its tile from groups of kWgmmaRasterGroup token tiles walked token tile first: a wave holds ~16 W tiles
// read by 8 blocks each at about the same slab, and 8 token tiles that stay in L2 while the group runs.
constexpr int kWgmmaRasterGroup = 8;
struct WgmmaTileOfBlock {
  int n_tile, m_tile;
};
NIBBLE_PLAN_HD constexpr WgmmaTileOfBlock wgmma_tile_of_block(int block, int n_tiles, int m_tiles) {
  const int per_group = kWgmmaRasterGroup * n_tiles;
  const int first_m = block / per_group * kWgmmaRasterGroup;
  const int rows = m_tiles - first_m < kWgmmaRasterGroup ? m_tiles - first_m : kWgmmaRasterGroup;
  const int local = block % per_group;
  return {local / rows, first_m + local % rows};
}

// ---- Stream-K -----------------------------------------------------------------------------------

// The share arithmetic is 32-bit (a 64-bit division is a called subroutine on the GPU, and its call
// made the consumers spill): plans keep iterations x blocks below 2^31.
constexpr int64_t kStreamKMaxProduct = (int64_t(1) << 31) - 1;

// First iteration of block b's share (b = blocks: the end). Shares differ by at most one iteration
// and none is empty when blocks <= iterations.
NIBBLE_PLAN_HD constexpr int stream_k_share_begin(int block, int iterations, int blocks) {
  return iterations * block / blocks;
}

// One span of a share: slabs [s0, s1) of tile `tile`.
struct StreamKSpan {
  int tile;
  int s0, s1;
  NIBBLE_PLAN_HD constexpr bool is_head() const { return s0 == 0; }
};
// The span of a share that starts at iteration `it` (< end).
NIBBLE_PLAN_HD constexpr StreamKSpan stream_k_span(int it, int end, int slabs) {
  const int tile = it / slabs;
  const int s0 = it - tile * slabs;
  const int s1 = end - it < slabs - s0 ? s0 + end - it : slabs;
  return {tile, s0, s1};
}
// The block whose share holds iteration x: the largest c with share_begin(c) <= x.
NIBBLE_PLAN_HD constexpr int stream_k_block_of(int x, int iterations, int blocks) {
  return ((x + 1) * blocks - 1) / iterations;
}
// The last of the blocks after a tile's owner that hold the rest of the tile (the owner itself
// where its share holds the whole tile).
NIBBLE_PLAN_HD constexpr int stream_k_last_contributor(int tile, int slabs, int iterations, int blocks) {
  return stream_k_block_of((tile + 1) * slabs - 1, iterations, blocks);
}

// The workspace: per block one flag per consumer warp (uint32, 0 between launches: each flag is raised
// by its contributor and put back to 0 by the owner that consumed it), then per block one fp32 partial
// tile in the consumers' fragment order (slot b, warp w, float4 j, lane).
constexpr int kStreamKConsumerWarps = 8;
constexpr size_t kStreamKPartialBytes = size_t(128) * 128 * 4;
NIBBLE_PLAN_HD constexpr size_t stream_k_flags_bytes(int blocks) {
  return (size_t(blocks) * kStreamKConsumerWarps * 4 + 255) / 256 * 256;
}
NIBBLE_PLAN_HD constexpr size_t stream_k_workspace_bytes(int blocks) {
  return stream_k_flags_bytes(blocks) + size_t(blocks) * kStreamKPartialBytes;
}

struct StreamKPlan {
  int blocks = 0;  // 0: no plan (iterations at or above 2^31)
  int tiles = 0, slabs = 0;
  double cost = 0;  // slab-times (the simulation below)
  int iterations() const { return tiles * slabs; }
};

// The simulated time of `blocks` blocks (the model at the top); O(blocks).
inline double stream_k_cost(int tiles, int slabs, int blocks) {
  using namespace wgmma_cost;
  const int iterations = tiles * slabs;
  // Block b's time up to the end of its share, and when its partial (if any) is in the workspace.
  const auto block_time = [&](int b, double* partial_ready) {
    const int begin = stream_k_share_begin(b, iterations, blocks), end = stream_k_share_begin(b + 1, iterations, blocks);
    const int spans = (end - 1) / slabs - begin / slabs + 1;
    const StreamKSpan first = stream_k_span(begin, end, slabs);
    if (partial_ready) *partial_ready = kFixed + double(first.s1 - first.s0) + kSpanEnd + kPartialWrite;
    return kFixed + double(end - begin) + kSpanEnd * double(spans) + (first.is_head() ? 0.0 : kPartialWrite);
  };
  double cost = 0;
  for (int b = 0; b < blocks; ++b) {
    double t = block_time(b, nullptr);
    const int end = stream_k_share_begin(b + 1, iterations, blocks), last_tile = (end - 1) / slabs;
    const bool owner = last_tile * slabs >= stream_k_share_begin(b, iterations, blocks) && end < (last_tile + 1) * slabs;
    if (owner) {  // its last span is the head of a tile the next blocks finish
      const int c_last = stream_k_last_contributor(last_tile, slabs, iterations, blocks);
      for (int c = b + 1; c <= c_last; ++c) {
        double ready = 0;
        block_time(c, &ready);
        t = std::max(t, ready);
      }
      t += kPartialRead * double(c_last - b);
    }
    cost = std::max(cost, t);
  }
  return cost;
}

inline StreamKPlan stream_k_plan(int64_t tiles, int slabs, int sms) {
  if (tiles < 1 || slabs < 1 || tiles * slabs > kStreamKMaxProduct) return {};
  StreamKPlan best{0, int(tiles), slabs, 1e300};
  const int64_t most = std::min<int64_t>({sms, tiles * slabs, kStreamKMaxProduct / (tiles * slabs)});
  for (int blocks = 1; blocks <= most; ++blocks) {
    const double cost = stream_k_cost(int(tiles), slabs, blocks);
    if (cost < best.cost) best = {blocks, int(tiles), slabs, cost};
  }
  return best;
}

// The workspace any stream-K plan on `sms` SMs can need (the executor's bound).
constexpr size_t stream_k_workspace_bound(int sms) { return stream_k_workspace_bytes(sms); }

// Where Auto takes stream-K over v9 (from kWgmmaMinM rows, given a workspace): by the measurement, not the
// model above. H100, session 21 (bench/RESULTS.md, `bench_gemm_w4a4 streamk`, call C: 72 rows of the 7B and
// 70B layers at M 64-4096): stream-K 1.51-1.83x v9 at 16-32 tiles (v9 splits K over clusters of 4-8),
// 0.83-0.92x at 8; from 64 tiles up it wins where v9's last wave leaves SMs idle — 0.93-1.27x (median
// 1.05) on the 17 rows whose v9 grid fills less than 90% of its waves' block slots (86, 96, 172, 192,
// 224, 344, 448, 688 tiles), 0.86-1.13x (median 0.96) on the rest.
inline bool stream_k_measured_win(int64_t tiles, int slabs, int sms) {
  if (tiles < 16) return false;
  if (tiles <= 32) return true;
  const int64_t blocks = tiles * wgmma_cluster_plan(tiles, slabs, sms).cluster;
  const int64_t waves = (blocks + sms - 1) / sms;
  return 10 * blocks < 9 * waves * sms;
}

// ---- The weight-streaming kernel (M <= 16) --------------------------------------------------------

// Its shape: kStreamWarps warps a block, each streaming 1 KB units (one slab of a 16-row W pair)
// through a ring of kStreamRing; a block's pairs' sums live in shared memory.
constexpr int kStreamWarps = 8;
constexpr int kStreamRing = 4;
constexpr int kStreamMaxPairs = 12;
constexpr int kStreamUnitBytes = 1024;
constexpr int kStreamBytesForFullRate = 48 << 10;  // per SM: ~1 µs of DRAM latency at an SM's share of 4.2 TB/s
// A block's fixed part (its prologue's latency, the barriers, the reduction): about 16 units' time.
// Without it the plan of 70B k/v was 256 blocks in clusters of 4 (17 units a block): 9.6 µs, against
// 5.9 µs for 128 blocks in clusters of 2 (H100, session 19); no other layer's plan changes.
constexpr double kStreamBlockCost = 16;

// Blocks of `pairs_per_block` consecutive 16-row W pairs each, K split over clusters of `cluster`
// blocks (rank r takes the r-th of `cluster` equal slab ranges).
struct StreamPlan {
  int blocks = 0, cluster = 1, pairs_per_block = 0;
  bool operator==(const StreamPlan&) const = default;
};

// Whole W pairs per block, K split over a cluster only where there are too few pairs for the SMs.
// Cost, in units on the busiest SM: its units, stretched when the SM cannot keep
// kStreamBytesForFullRate of them in flight (unless all of its units are requested at once),
// kStreamBlockCost per block it holds, a wave penalty and a little for the cluster's barrier. Fewer
// pairs per block win ties: more blocks, more bytes in flight.
inline StreamPlan stream_plan(int64_t w_pairs, int slabs, int sms, int blocks_per_sm) {
  constexpr int64_t kUnitsForFullRate = kStreamBytesForFullRate / kStreamUnitBytes;
  const int64_t slots = int64_t(sms) * blocks_per_sm;
  StreamPlan best{};
  double best_cost = 1e300;
  for (int cluster : {1, 2, 4, 8}) {
    const int per_rank = (slabs + cluster - 1) / cluster;
    if ((cluster - 1) * per_rank >= slabs) break;  // a rank without slabs
    for (int ppb = 1; ppb <= kStreamMaxPairs; ++ppb) {
      const int64_t blocks = (w_pairs + ppb - 1) / ppb * cluster;
      const int64_t waves = (blocks + slots - 1) / slots, on_sm = (blocks + sms - 1) / sms;
      const int64_t units = int64_t(ppb) * per_rank, per_sm = on_sm * units;
      const int64_t resident = std::min<int64_t>(on_sm, blocks_per_sm);
      const int64_t in_flight = resident * kStreamWarps * std::min<int64_t>(kStreamRing, (units + kStreamWarps - 1) / kStreamWarps);
      const double stretch = in_flight >= per_sm ? 1.0 : std::max(1.0, double(kUnitsForFullRate) / double(in_flight));
      const double cost = double(per_sm) * stretch + kStreamBlockCost * double(resident) + 32.0 * double(waves - 1) +
                          (cluster > 1 ? 2 : 0);
      if (cost < best_cost) {
        best_cost = cost;
        best = {int(blocks), cluster, ppb};
      }
    }
  }
  return best;
}

}  // namespace nibble::cuda
