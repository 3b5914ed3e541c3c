// gemm_w4a4's wgmma launch plans (gemm_w4a4_plan.h, host code): the stream-K shares walked exactly
// as the kernel walks them, over many shapes and SM counts: every (tile, slab) iteration covered
// once, the owner / contributor roles that make the fixup deterministic and free of wait cycles, the
// workspace within the bound the executor allocates, the grid within the SMs; the cluster plan's
// limits; the predictions for the bench's Llama shapes on an H200 (printed for the notes); and the
// weight-streaming kernel's plan (M <= 16).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "nibble/backend/cuda/gemm_w4a4_plan.h"

namespace nibble::cuda {
namespace {

// What the kernel does with one share, replayed on the host: its spans in order.
std::vector<StreamKSpan> spans_of(int block, const StreamKPlan& plan) {
  std::vector<StreamKSpan> spans;
  const int end = stream_k_share_begin(block + 1, plan.iterations(), plan.blocks);
  for (int it = stream_k_share_begin(block, plan.iterations(), plan.blocks); it < end;) {
    const StreamKSpan s = stream_k_span(it, end, plan.slabs);
    spans.push_back(s);
    it += s.s1 - s.s0;
  }
  return spans;
}

// Checks one plan; returns the number of tiles it cuts between blocks.
int check_stream_k(const StreamKPlan& plan, int64_t tiles, int slabs, int sms) {
  SCOPED_TRACE(::testing::Message() << "tiles " << tiles << " slabs " << slabs << " sms " << sms << " blocks "
                                    << plan.blocks);
  EXPECT_GE(plan.blocks, 1);
  EXPECT_LE(plan.blocks, sms);
  EXPECT_LE(plan.blocks, tiles * slabs);
  EXPECT_LE(int64_t(plan.iterations()) * plan.blocks, kStreamKMaxProduct);
  EXPECT_LE(stream_k_workspace_bytes(plan.blocks), stream_k_workspace_bound(sms));
  if (::testing::Test::HasFailure()) return 0;

  std::vector<int> covered(size_t(plan.iterations()), 0);
  // Per tile: its owner (the block whose span starts at slab 0 but ends before the tile does) and
  // its contributors (blocks whose span starts after slab 0), each with the slab range it holds.
  std::map<int, int> owner, owner_end;
  std::map<int, std::vector<std::pair<int, StreamKSpan>>> contributors;
  std::vector<int> contributes_to(size_t(plan.blocks), -1);
  for (int b = 0; b < plan.blocks; ++b) {
    const std::vector<StreamKSpan> spans = spans_of(b, plan);
    EXPECT_FALSE(spans.empty());
    for (size_t i = 0; i < spans.size(); ++i) {
      const StreamKSpan& s = spans[i];
      EXPECT_LE(0, s.s0);
      EXPECT_LT(s.s0, s.s1);
      EXPECT_LE(s.s1, slabs);
      for (int k = s.s0; k < s.s1; ++k) ++covered[size_t(s.tile) * size_t(slabs) + size_t(k)];
      if (!s.is_head()) {
        // A tail: only ever the share's first span (the kernel writes its partial before it could
        // wait for anything), so each block fills at most one partial slot.
        EXPECT_EQ(i, 0u);
        EXPECT_EQ(contributes_to[size_t(b)], -1);
        contributes_to[size_t(b)] = s.tile;
        contributors[s.tile].emplace_back(b, s);
      } else if (s.s1 < slabs) {
        // A head cut short: only ever the share's last span (the kernel's only wait).
        EXPECT_EQ(i + 1, spans.size());
        EXPECT_EQ(owner.count(s.tile), 0u);
        owner[s.tile] = b;
        owner_end[s.tile] = s.s1;
      }
    }
  }
  for (size_t i = 0; i < covered.size(); ++i) EXPECT_EQ(covered[i], 1) << "iteration " << i;
  // Every cut tile has one owner; its contributors are exactly the blocks owner + 1 .. the kernel's
  // last contributor, in block order holding the slabs after the owner's, contiguously up to the end.
  EXPECT_EQ(owner.size(), contributors.size());
  for (const auto& [tile, b] : owner) {
    const auto found = contributors.find(tile);
    EXPECT_NE(found, contributors.end()) << "tile " << tile;
    if (found == contributors.end()) continue;
    const int last = stream_k_last_contributor(tile, slabs, plan.iterations(), plan.blocks);
    EXPECT_EQ(int(found->second.size()), last - b) << "tile " << tile;
    int next_slab = owner_end[tile];
    for (size_t i = 0; i < found->second.size(); ++i) {
      const auto& [c, s] = found->second[i];
      EXPECT_EQ(c, b + 1 + int(i)) << "tile " << tile;  // waits only for later blocks: no cycle
      EXPECT_EQ(s.s0, next_slab) << "tile " << tile;
      next_slab = s.s1;
    }
    EXPECT_EQ(next_slab, slabs) << "tile " << tile;
  }
  return int(owner.size());
}

TEST(GemmW4A4Plan, StreamKCoversEveryIterationOnceWithOwnersBeforeContributors) {
  int plans = 0, cut = 0;
  for (int sms : {1, 2, 7, 66, 78, 114, 132})
    for (int64_t tiles : {1, 2, 3, 8, 11, 16, 31, 32, 47, 64, 95, 96, 127, 128, 131, 132, 133, 172, 264, 321, 514,
                          1024, 1376, 3584})
      for (int slabs : {1, 2, 3, 17, 33, 34, 65, 87, 225}) {
        const StreamKPlan plan = stream_k_plan(tiles, slabs, sms);
        cut += check_stream_k(plan, tiles, slabs, sms);
        ++plans;
        if (::testing::Test::HasFailure()) return;
      }
  std::printf("stream-K: %d plans checked, %d tiles cut between blocks\n", plans, cut);
}

TEST(GemmW4A4Plan, StreamKEveryBlockCountIsAValidSchedule) {
  // The kernel must be right for any grid the plan could pick, not only today's argmin.
  for (int64_t tiles : {1, 5, 16, 64, 96, 172})
    for (int slabs : {1, 33, 65})
      for (int blocks = 1; blocks <= 132 && blocks <= tiles * slabs; ++blocks) {
        StreamKPlan plan;
        plan.blocks = blocks;
        plan.tiles = int(tiles);
        plan.slabs = slabs;
        plan.cost = stream_k_cost(int(tiles), slabs, blocks);
        check_stream_k(plan, tiles, slabs, 132);
        if (::testing::Test::HasFailure()) return;
      }
}

TEST(GemmW4A4Plan, StreamKRefusesIterationsBeyond32Bits) {
  EXPECT_EQ(stream_k_plan(int64_t(1) << 26, 64, 132).blocks, 0);  // 2^32 iterations
  const StreamKPlan big = stream_k_plan(int64_t(1) << 22, 65, 132);  // 2.7e8 iterations: at most 7 blocks
  EXPECT_GE(big.blocks, 1);
  EXPECT_LE(int64_t(big.iterations()) * big.blocks, kStreamKMaxProduct);
}

TEST(GemmW4A4Plan, ClusterPlanWithinLimits) {
  for (int sms : {1, 78, 132})
    for (int64_t tiles : {1, 8, 16, 64, 132, 133, 1024})
      for (int slabs : {1, 2, 3, 33, 65, 225}) {
        const WgmmaClusterPlan p = wgmma_cluster_plan(tiles, slabs, sms);
        EXPECT_TRUE(p.cluster == 1 || p.cluster == 2 || p.cluster == 4 || p.cluster == 8);
        EXPECT_GE(int64_t(p.cluster) * p.slabs_per_rank, slabs);
        EXPECT_LT(int64_t(p.cluster - 1) * p.slabs_per_rank, slabs);  // no rank without slabs
        EXPECT_GT(p.cost, 0);
      }
}

TEST(GemmW4A4Plan, BlockOrderCoversEveryTileOnceTokenTilesFirst) {
  for (int n_tiles : {1, 3, 32, 224})
    for (int m_tiles : {1, 2, 7, 8, 9, 17, 32}) {
      std::vector<int> seen(size_t(n_tiles) * size_t(m_tiles), 0);
      for (int b = 0; b < n_tiles * m_tiles; ++b) {
        const WgmmaTileOfBlock t = wgmma_tile_of_block(b, n_tiles, m_tiles);
        ASSERT_TRUE(t.n_tile >= 0 && t.n_tile < n_tiles && t.m_tile >= 0 && t.m_tile < m_tiles)
            << b << " of " << n_tiles << " x " << m_tiles;
        ++seen[size_t(t.n_tile) * size_t(m_tiles) + size_t(t.m_tile)];
        // Within a group the next block takes the next token tile of the same W tile.
        if (b + 1 < n_tiles * m_tiles && (b + 1) % (kWgmmaRasterGroup * n_tiles) != 0) {
          const WgmmaTileOfBlock next = wgmma_tile_of_block(b + 1, n_tiles, m_tiles);
          const int rows = std::min(kWgmmaRasterGroup, m_tiles - t.m_tile / kWgmmaRasterGroup * kWgmmaRasterGroup);
          if ((b % (kWgmmaRasterGroup * n_tiles)) % rows + 1 < rows) {
            EXPECT_EQ(next.n_tile, t.n_tile);
            EXPECT_EQ(next.m_tile, t.m_tile + 1);
          }
        }
      }
      for (size_t i = 0; i < seen.size(); ++i)
        ASSERT_EQ(seen[i], 1) << "tile " << i << " of " << n_tiles << " x " << m_tiles;
    }
  // The 70B gate/up grid at M = 4096 (224 x 32 tiles): a wave of 132 blocks reads 17 W tiles, not 132.
  int max_n = 0;
  for (int b = 0; b < 132; ++b) max_n = std::max(max_n, wgmma_tile_of_block(b, 224, 32).n_tile);
  EXPECT_EQ(max_n, 16);
}

TEST(GemmW4A4Plan, PredictionsForTheBenchShapesOnAnH200) {
  // The table of bench/NOTES-gemm_w4a4.md "Session 15": slab-times of v9's cluster plan and of
  // stream-K per shape, 132 SMs, keeper 128. Checks only that stream-K is never predicted slower
  // than v9 by more than its fixup can cost (Auto decides by the measurement: stream_k_measured_win).
  struct Shape {
    const char* name;
    int64_t N, K;
  };
  const Shape shapes[] = {{"7B q/k/v/o", 4096, 4096},  {"7B gate/up", 11008, 4096}, {"7B qkv fused", 12288, 4096},
                          {"7B gu fused", 22016, 4096}, {"7B down", 4096, 11008},    {"70B q/o", 8192, 8192},
                          {"70B k/v", 1024, 8192},      {"70B gate/up", 28672, 8192}, {"70B down", 8192, 28672}};
  std::printf("| shape | M | tiles | slabs | v9 cluster | v9 cost | stream-K blocks | stream-K cost | v9 / stream-K |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& sh : shapes)
    for (int64_t M : {64, 100, 128, 192, 256, 512, 1024, 2048}) {
      const int slabs = int((sh.K - 128) / 128) + 2;  // keeper 128: one 8-bit group in two slabs
      const int64_t rows_pad = (M + 15) / 16 * 16;
      const int64_t tiles = wgmma_tiles(sh.N, rows_pad);
      const WgmmaClusterPlan v9 = wgmma_cluster_plan(tiles, slabs, 132);
      const StreamKPlan sk = stream_k_plan(tiles, slabs, 132);
      std::printf("| %s | %lld | %lld | %d | %d | %.1f | %d | %.1f | %.2f |\n", sh.name, (long long)M,
                  (long long)tiles, slabs, v9.cluster, v9.cost, sk.blocks, sk.cost, v9.cost / sk.cost);
      EXPECT_LE(sk.cost, v9.cost * 1.3) << sh.name << " M=" << M;
    }
}

TEST(GemmW4A4Plan, AutoRuleFitsTheMeasuredTable) {
  // Session 21's `bench_gemm_w4a4 streamk` of this code (call C; H100, 132 SMs, keeper 128; bench/RESULTS.md):
  // tiles, slabs, v9 µs, stream-K µs of the 72 rows (7B and 70B layers, M 64-4096). Auto's rule must cost at most 30%
  // over the faster path on any row and beat both older rules in total: always v9, and stream-K at
  // 16-32 tiles only (session 15).
  struct Row {
    int64_t tiles;
    int slabs;
    double v9_us, stream_k_us;
  };
  const Row rows[] = {
      {96, 33, 27.10, 26.43}, {96, 33, 27.24, 27.76}, {96, 33, 27.25, 29.28}, {192, 33, 53.11, 49.27}, {384, 33, 78.52, 87.24}, {768, 33, 155.33, 167.49},
      {1536, 33, 302.66, 319.01}, {3072, 33, 599.74, 622.46}, {32, 33, 24.57, 16.27}, {32, 33, 27.11, 17.60}, {32, 33, 28.22, 18.57}, {64, 33, 18.70, 21.60},
      {128, 33, 26.95, 30.45}, {256, 33, 52.55, 61.28}, {512, 33, 103.66, 113.33}, {1024, 33, 204.19, 216.42}, {172, 33, 52.72, 41.65}, {172, 33, 53.50, 44.30},
      {172, 33, 54.25, 46.59}, {344, 33, 79.30, 80.64}, {688, 33, 156.93, 152.00}, {1376, 33, 283.52, 292.77}, {2752, 33, 555.71, 572.90}, {5504, 33, 1069.70, 1114.11},
      {86, 33, 29.47, 27.29}, {86, 33, 28.14, 26.37}, {86, 33, 28.31, 27.20}, {172, 33, 52.33, 46.52}, {344, 33, 76.60, 79.93}, {688, 33, 155.36, 156.61},
      {1376, 33, 277.28, 291.20}, {2752, 33, 524.99, 564.38}, {32, 87, 50.07, 27.33}, {32, 87, 44.26, 26.83}, {32, 87, 44.36, 26.98}, {64, 87, 35.89, 39.03},
      {128, 87, 62.23, 69.48}, {256, 87, 123.74, 129.81}, {512, 87, 245.95, 251.42}, {1024, 87, 486.11, 484.06}, {64, 65, 31.19, 33.34}, {64, 65, 30.22, 33.39},
      {64, 65, 29.97, 34.24}, {128, 65, 48.43, 51.93}, {256, 65, 94.75, 102.43}, {512, 65, 188.67, 196.06}, {1024, 65, 371.26, 377.44}, {2048, 65, 743.42, 742.94},
      {8, 65, 18.20, 19.76}, {8, 65, 16.40, 19.75}, {8, 65, 17.55, 20.48}, {16, 65, 32.13, 21.19}, {32, 65, 36.87, 23.98}, {64, 65, 28.96, 33.42},
      {128, 65, 48.52, 51.88}, {256, 65, 95.08, 101.45}, {224, 65, 94.29, 85.59}, {224, 65, 94.53, 88.89}, {224, 65, 94.30, 90.14}, {448, 65, 197.25, 174.18},
      {896, 65, 323.23, 328.83}, {1792, 65, 692.45, 657.18}, {3584, 65, 1331.90, 1341.98}, {7168, 65, 2467.71, 2660.19}, {64, 225, 113.71, 114.18}, {64, 225, 91.04, 85.32},
      {64, 225, 81.44, 84.48}, {128, 225, 151.49, 157.31}, {256, 225, 336.42, 317.60}, {512, 225, 624.13, 604.83}, {1024, 225, 1311.62, 1208.42}, {2048, 225, 2359.33, 2445.92}};
  double chosen = 0, always_v9 = 0, old_rule = 0, best = 0;
  for (const Row& r : rows) {
    const double t = stream_k_measured_win(r.tiles, r.slabs, 132) ? r.stream_k_us : r.v9_us;
    EXPECT_LE(t, 1.3 * std::min(r.v9_us, r.stream_k_us)) << "tiles " << r.tiles << " slabs " << r.slabs;
    chosen += t;
    always_v9 += r.v9_us;
    old_rule += r.tiles >= 16 && r.tiles <= 32 ? r.stream_k_us : r.v9_us;
    best += std::min(r.v9_us, r.stream_k_us);
  }
  EXPECT_LT(chosen, old_rule);
  EXPECT_LT(chosen, always_v9);
  std::printf("Auto's rule on the session-21 table: %.0f us, best path per row %.0f, old rule %.0f, always v9 %.0f\n",
              chosen, best, old_rule, always_v9);
}

TEST(GemmW4A4Plan, StreamPlansCoverWAndKeepTheMeasuredChoices) {
  for (int sms : {78, 114, 132})
    for (int blocks_per_sm : {1, 2})
      for (int64_t pairs : {1, 2, 7, 32, 64, 256, 688, 1376, 1792})
        for (int slabs : {1, 2, 6, 34, 66, 88, 226}) {
          const StreamPlan p = stream_plan(pairs, slabs, sms, blocks_per_sm);
          const std::string what = fmt::format("sms={} blocks/SM={} pairs={} slabs={}", sms, blocks_per_sm, pairs, slabs);
          ASSERT_TRUE(p.cluster == 1 || p.cluster == 2 || p.cluster == 4 || p.cluster == 8) << what;
          ASSERT_GE(p.pairs_per_block, 1) << what;
          ASSERT_LE(p.pairs_per_block, kStreamMaxPairs) << what;
          // Every pair in exactly one cluster, every rank of a cluster with slabs.
          EXPECT_EQ(p.blocks, (pairs + p.pairs_per_block - 1) / p.pairs_per_block * p.cluster) << what;
          const int per_rank = (slabs + p.cluster - 1) / p.cluster;
          EXPECT_LT((p.cluster - 1) * per_rank, slabs) << what;
        }
  // Measured on an H100 (132 SMs, two blocks an SM; bench/RESULTS.md "Session 19"): 70B k/v (64 pairs,
  // 66 slabs) in 128 blocks, clusters of 2: 5.9 µs, where 256 blocks in clusters of 4 took 9.6; 7B
  // q/k/v/o (256 pairs, 34 slabs) in 256 blocks of one pair: 6.25 µs, where 128 blocks of two took 7.7.
  EXPECT_EQ(stream_plan(64, 66, 132, 2), (StreamPlan{128, 2, 1}));
  EXPECT_EQ(stream_plan(256, 34, 132, 2), (StreamPlan{256, 1, 1}));
}

}  // namespace
}  // namespace nibble::cuda
