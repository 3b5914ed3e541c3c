// gemm_w4a4's wgmma launch plans (gemm_w4a4_plan.h, host code): the stream-K shares walked exactly
// as the kernel walks them, over many shapes and SM counts: every (tile, slab) iteration covered
// once, the owner / contributor roles that make the fixup deterministic and free of wait cycles, the
// workspace within the bound the executor allocates, the grid within the SMs; the cluster plan's
// limits; the predictions for the bench's Llama shapes on an H200 (printed for the notes); and the
// weight-streaming kernel's plan (M <= 16).
#include <fmt/format.h>
#include <gtest/gtest.h>

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
