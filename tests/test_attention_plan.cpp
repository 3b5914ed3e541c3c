// attention_decode's split plan (attention_plan.h, host code): limits, the workspace bound over a
// grid of shapes, and the plans the cost model makes for the bench's Llama shapes on an H200.
#include <gtest/gtest.h>

#include <cstdio>

#include "nibble/backend/cuda/attention_plan.h"
#include "nibble/backend/cuda/kv_cache_paged.h"

namespace nibble::cuda {
namespace {

DecodePlanShape shape(int batch, int kv_heads, int group, int head_dim, int len, bool int4, int sms, int per_sm) {
  DecodePlanShape s;
  s.batch = batch;
  s.kv_heads = kv_heads;
  s.group = group;
  s.head_dim = head_dim;
  s.max_seq_len = len;
  PagedKVLayout layout;
  layout.head_dim = head_dim;
  layout.dtype = int4 ? KVDtype::Int4 : KVDtype::Fp16;
  s.chunk_bytes = layout.chunk_bytes();
  s.sms = sms;
  s.blocks_per_sm = per_sm;
  return s;
}

TEST(AttentionDecodePlan, WithinLimitsAndWorkspaceBound) {
  int checked = 0;
  for (int sms : {1, 8, 78, 132})
    for (int per_sm : {1, 2, 3, 5})
      for (int head_dim : {64, 128})
        for (int kv_heads : {1, 2, 8, 32})
          for (int group : {1, 2, 4, 8, 16})
            for (int batch : {1, 2, 3, 16, 64, 256, 2048})
              for (int len : {1, 15, 16, 17, 100, 511, 2048, 2049, 8192, 100000}) {
                for (bool int4 : {true, false}) {
                  const DecodePlanShape s = shape(batch, kv_heads, group, head_dim, len, int4, sms, per_sm);
                  const int splits = plan_decode_splits(s);
                  const int64_t chunks = (int64_t(len) + 15) / 16;
                  ASSERT_GE(splits, 1);
                  ASSERT_LE(splits, kDecodeMaxSplits);
                  ASSERT_LE(splits, std::max<int64_t>(chunks, 1));
                  if (splits > 1) {
                    // One wave at most, pairs within the arrival counters, workspace within the bound.
                    ASSERT_LE(int64_t(batch) * kv_heads * splits, int64_t(sms) * per_sm);
                    ASSERT_LE(int64_t(batch) * kv_heads, kDecodeMaxSplitPairs);
                    ASSERT_LE(decode_workspace_bytes(batch, kv_heads * group, head_dim, splits),
                              decode_workspace_bound(group, head_dim, sms, per_sm));
                  }
                  // The plan is the argmin of the model and deterministic.
                  for (int n = 1; n <= decode_max_splits(s); ++n)
                    ASSERT_LE(decode_predicted_us(s, splits), decode_predicted_us(s, n));
                  ASSERT_EQ(plan_decode_splits(s), splits);
                  ++checked;
                }
              }
  EXPECT_GT(checked, 10000);
}

// The bench's shapes on an H200 (132 SMs; INT4 K after RoPE runs the KT form at 5 blocks per SM):
// the splits the notes' table (bench/NOTES-attention.md, "v10") lists.
TEST(AttentionDecodePlan, H200LlamaShapes) {
  struct Row {
    int kv_heads, group, batch, len, splits;
  };
  const Row rows[] = {
      {8, 8, 1, 2048, 16}, {8, 8, 1, 8192, 32}, {8, 8, 16, 2048, 4}, {8, 8, 16, 8192, 4}, {8, 8, 64, 2048, 1},
      {32, 1, 1, 2048, 8}, {32, 1, 1, 8192, 16}, {32, 1, 16, 2048, 1}, {32, 1, 64, 8192, 1},
  };
  for (const Row& r : rows) {
    const DecodePlanShape s = shape(r.batch, r.kv_heads, r.group, 128, r.len, true, 132, 5);
    EXPECT_EQ(plan_decode_splits(s), r.splits) << "kv_heads " << r.kv_heads << " G " << r.group << " batch "
                                               << r.batch << " len " << r.len;
  }
}

}  // namespace
}  // namespace nibble::cuda
