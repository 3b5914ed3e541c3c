// The paged KV cache: the host allocator (block tables, out-of-pages as a return value, fork with
// copy-on-write, truncate/free), the INT4 row packing, and on a GPU the pool, the --gpu-mem-fraction
// rule and the device-side copy-on-write of a shared page.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <set>

#include "gpu_test_util.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/kv_cache_paged.h"

namespace nibble::cuda {
namespace {

TEST(PageAllocator, AppendAllocatesPagesAndSignalsOutOfPages) {
  PageAllocator a(10, 16);
  const SeqId s = a.add_sequence();
  std::vector<PageCopy> copies;
  ASSERT_TRUE(a.append(s, 1, &copies));
  EXPECT_EQ(a.block_table(s).size(), 1u);
  ASSERT_TRUE(a.append(s, 15, &copies));
  EXPECT_EQ(a.block_table(s).size(), 1u);
  ASSERT_TRUE(a.append(s, 1, &copies));
  EXPECT_EQ(a.block_table(s).size(), 2u);
  EXPECT_EQ(a.length(s), 17);
  EXPECT_EQ(a.free_pages(), 8);
  // 8 free pages hold 128 more tokens minus the 15 left in the second page.
  EXPECT_EQ(a.pages_needed(s, 15 + 128), 8);
  EXPECT_EQ(a.pages_needed(s, 15 + 129), 9);
  EXPECT_FALSE(a.append(s, 15 + 129, &copies));  // out of pages: nothing changes
  EXPECT_EQ(a.length(s), 17);
  EXPECT_EQ(a.free_pages(), 8);
  EXPECT_TRUE(a.append(s, 15 + 128, &copies));
  EXPECT_EQ(a.free_pages(), 0);
  EXPECT_FALSE(a.append(s, 1, &copies));
  EXPECT_TRUE(copies.empty());
  // Pages are distinct.
  const auto& t = a.block_table(s);
  EXPECT_EQ(std::set<int32_t>(t.begin(), t.end()).size(), t.size());
  a.free_sequence(s);
  EXPECT_EQ(a.free_pages(), 10);
  EXPECT_FALSE(a.alive(s));
  EXPECT_THROW(a.length(s), Error);
}

TEST(PageAllocator, ForkSharesPagesAndCopiesOnWrite) {
  PageAllocator a(8, 16);
  const SeqId p = a.add_sequence();
  std::vector<PageCopy> copies;
  ASSERT_TRUE(a.append(p, 20, &copies));  // pages: full + 4 tokens
  const SeqId c = a.fork(p);
  EXPECT_EQ(a.length(c), 20);
  EXPECT_EQ(a.block_table(c), a.block_table(p));
  EXPECT_EQ(a.free_pages(), 6);
  for (int32_t pg : a.block_table(p)) EXPECT_EQ(a.refcount(pg), 2);
  // The child writes token 20: the shared partial page is copied, the full one stays shared.
  EXPECT_EQ(a.pages_needed(c, 1), 1);
  ASSERT_TRUE(a.append(c, 1, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, a.block_table(p)[1]);
  EXPECT_EQ(copies[0].dst, a.block_table(c)[1]);
  EXPECT_EQ(a.block_table(c)[0], a.block_table(p)[0]);
  EXPECT_EQ(a.refcount(a.block_table(p)[0]), 2);
  EXPECT_EQ(a.refcount(a.block_table(p)[1]), 1);
  // The parent now owns its partial page alone: no copy.
  copies.clear();
  ASSERT_TRUE(a.append(p, 12 + 16, &copies));
  EXPECT_TRUE(copies.empty());
  // A fork at a page boundary copies nothing when the child appends.
  const SeqId c2 = a.fork(p);  // length 48
  ASSERT_TRUE(a.append(c2, 5, &copies));
  EXPECT_TRUE(copies.empty());
  a.free_sequence(p);
  a.free_sequence(c);
  a.free_sequence(c2);
  EXPECT_EQ(a.free_pages(), 8);
}

TEST(PageAllocator, ReserveTakesPagesAheadAndAppendThenCannotFail) {
  PageAllocator a(6, 16);
  std::vector<PageCopy> copies;
  const SeqId p = a.add_sequence();
  ASSERT_TRUE(a.append(p, 20, &copies));  // 2 pages, the second shared after the fork
  const SeqId c = a.fork(p);
  const SeqId q = a.add_sequence();
  // c reserves 30 tokens: the shared partial page is copied now, one new page taken; length stays.
  ASSERT_TRUE(a.reserve(c, 30, &copies));
  EXPECT_EQ(a.length(c), 20);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, a.block_table(p)[1]);
  EXPECT_EQ(a.block_table(c).size(), 4u);  // positions 0..49
  EXPECT_EQ(a.free_pages(), 6 - 2 - 3);
  // Reservations add up: q cannot take 2 pages while c holds its own.
  EXPECT_FALSE(a.reserve(q, 17, &copies));
  EXPECT_EQ(a.free_pages(), 1);
  EXPECT_TRUE(a.block_table(q).empty());
  ASSERT_TRUE(a.reserve(q, 16, &copies));
  EXPECT_EQ(a.free_pages(), 0);
  // Appends within the reservations take nothing and copy nothing.
  copies.clear();
  EXPECT_EQ(a.pages_needed(c, 30), 0);
  ASSERT_TRUE(a.append(c, 30, &copies));
  ASSERT_TRUE(a.append(q, 16, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_FALSE(a.append(q, 1, &copies));
  // A fork shares only the pages of tokens; truncate gives the reserved pages back.
  a.truncate(q, 0);
  ASSERT_TRUE(a.reserve(p, 12, &copies));  // fills p's own second page: nothing new
  EXPECT_EQ(a.block_table(p).size(), 2u);
  ASSERT_TRUE(a.reserve(p, 13, &copies));
  EXPECT_EQ(a.block_table(p).size(), 3u);
  const SeqId f = a.fork(p);
  EXPECT_EQ(a.block_table(f).size(), 2u);
  EXPECT_EQ(a.refcount(a.block_table(p)[2]), 1);
  a.truncate(p, 20);
  EXPECT_EQ(a.block_table(p).size(), 2u);
  for (SeqId s : {p, c, q, f}) a.free_sequence(s);
  EXPECT_EQ(a.free_pages(), 6);
}

TEST(PageAllocator, TruncateAndRandomOpsKeepRefcountsConsistent) {
  std::mt19937_64 rng(testing::fresh_seed());
  PageAllocator a(64, 16);
  std::vector<SeqId> live;
  for (int step = 0; step < 5000; ++step) {
    const int op = int(rng() % 5);
    if (op == 0 || live.empty()) {
      live.push_back(a.add_sequence());
    } else {
      const size_t i = rng() % live.size();
      const SeqId s = live[i];
      if (op == 1) {
        std::vector<PageCopy> copies;
        const int64_t n = int64_t(rng() % 40);
        const int64_t need = a.pages_needed(s, n), before = a.free_pages();
        const bool ok = a.append(s, n, &copies);
        EXPECT_EQ(ok, need <= before);
        if (ok) EXPECT_EQ(a.free_pages(), before - need);
      } else if (op == 2 && live.size() < 20) {
        live.push_back(a.fork(s));
      } else if (op == 3) {
        a.truncate(s, int64_t(rng() % uint64_t(a.length(s) + 1)));
      } else {
        a.free_sequence(s);
        live.erase(live.begin() + ptrdiff_t(i));
      }
    }
    // Invariant: refcount = number of table entries naming the page; free = refcount 0.
    std::vector<int> count(64, 0);
    for (SeqId s : live) {
      EXPECT_EQ(int64_t(a.block_table(s).size()), (a.length(s) + 15) / 16);
      for (int32_t p : a.block_table(s)) ++count[size_t(p)];
    }
    int64_t free_count = 0;
    for (int p = 0; p < 64; ++p) {
      ASSERT_EQ(count[size_t(p)], a.refcount(p)) << "page " << p << " at step " << step;
      free_count += count[size_t(p)] == 0;
    }
    ASSERT_EQ(free_count, a.free_pages());
  }
}

TEST(PagedKVLayout, Int4RowPackingRoundTripsAndPairsDims) {
  std::mt19937 rng(uint32_t(testing::fresh_seed()));
  for (int D : {64, 128}) {
    std::vector<uint8_t> codes(static_cast<size_t>(D)), back(static_cast<size_t>(D)), row(static_cast<size_t>(D / 2));
    for (auto& c : codes) c = uint8_t(rng() % 16);
    pack_int4_row(codes.data(), D, row.data());
    unpack_int4_row(row.data(), D, back.data());
    EXPECT_EQ(codes, back);
    // (word >> 4i) & 0x000F000F = dims (2i, 2i+1) of the word's 8 dims.
    for (int w = 0; w < D / 8; ++w) {
      const uint32_t word = uint32_t(row[size_t(4 * w)]) | uint32_t(row[size_t(4 * w + 1)]) << 8 |
                            uint32_t(row[size_t(4 * w + 2)]) << 16 | uint32_t(row[size_t(4 * w + 3)]) << 24;
      for (int i = 0; i < 4; ++i) {
        const uint32_t pr = (word >> (4 * i)) & 0x000F000Fu;
        EXPECT_EQ(pr & 0xF, codes[size_t(8 * w + 2 * i)]);
        EXPECT_EQ(pr >> 16, codes[size_t(8 * w + 2 * i + 1)]);
      }
    }
  }
  // Every byte of a block belongs to exactly one field of one token; chunks are 16-byte aligned.
  for (int D : {64, 128})
    for (int P : {16, 32, 64, 256})
      for (KVDtype dt : {KVDtype::Fp16, KVDtype::Int4}) {
        PagedKVLayout l{2, 4, D, P, dt};
        EXPECT_EQ(l.chunk_bytes() % 16, 0);
        EXPECT_EQ(l.block_bytes(), dt == KVDtype::Int4 ? P * D + 6 * P : 4 * P * D);
        std::vector<int> owner(size_t(l.block_bytes()), 0);
        const auto mark = [&](int64_t off, int64_t n) {
          for (int64_t i = 0; i < n; ++i) ++owner[size_t(off + i)];
        };
        for (int r = 0; r < P; ++r) {
          EXPECT_EQ(l.chunk_offset(r) % 16, 0);
          mark(l.k_row_offset(r), l.row_bytes());
          mark(l.v_row_offset(r), l.row_bytes());
          if (dt == KVDtype::Int4) {
            mark(l.k_scale_offset(r), 2);
            mark(l.v_scale_offset(r), 2);
            mark(l.k_zero_offset(r), 1);
            mark(l.v_zero_offset(r), 1);
          }
        }
        for (int x : owner) ASSERT_EQ(x, 1) << "D " << D << " P " << P;
      }
}

TEST(PagedKVCache, PoolFromMemoryFractionAndCopyOnWriteOnDevice) {
  NIBBLE_REQUIRE_GPU();
  const PagedKVLayout l{3, 2, 128, 16, KVDtype::Int4};
  const int64_t n_all = PagedKVCache::pages_for_free_memory(l, 0.5);
  const int64_t n_small = PagedKVCache::pages_for_free_memory(l, 0.01);
  EXPECT_GT(n_all, n_small);
  EXPECT_GT(n_small, 0);
  EXPECT_EQ(PagedKVCache::pages_for_free_memory(l, 0.01, int64_t(1) << 50), 0);
  EXPECT_THROW(PagedKVCache::pages_for_free_memory(l, 1.5), Error);
  EXPECT_THROW(PagedKVCache(PagedKVLayout{1, 1, 128, 48, KVDtype::Int4}, 4), Error);  // not a power of two

  PagedKVCache cache(l, 6);
  const KVCacheView v = cache.view();
  // Fill every page of every layer with a byte naming (layer, page).
  for (int layer = 0; layer < l.num_layers; ++layer)
    for (int page = 0; page < 6; ++page)
      NIBBLE_CUDA_CHECK(cudaMemset(v.pool + block_offset(l, 6, layer, page, 0), 16 * layer + page,
                                   size_t(l.block_bytes() * l.kv_heads)));
  const SeqId p = cache.add_sequence();
  ASSERT_TRUE(cache.append(p, 20));
  const SeqId c = cache.fork(p);
  ASSERT_TRUE(cache.append(c, 1));
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  const int32_t src = cache.allocator().block_table(p)[1], dst = cache.allocator().block_table(c)[1];
  ASSERT_NE(src, dst);
  std::vector<uint8_t> host(size_t(cache.pool_bytes()));
  NIBBLE_CUDA_CHECK(cudaMemcpy(host.data(), v.pool, host.size(), cudaMemcpyDeviceToHost));
  for (int layer = 0; layer < l.num_layers; ++layer)
    for (int h = 0; h < l.kv_heads; ++h)
      for (int64_t i = 0; i < l.block_bytes(); ++i) {
        ASSERT_EQ(host[size_t(block_offset(l, 6, layer, dst, h) + i)], 16 * layer + src) << layer << " " << h << " " << i;
        ASSERT_EQ(host[size_t(block_offset(l, 6, layer, src, h) + i)], 16 * layer + src);
      }
  // Out of pages: a false return, the cache unchanged.
  const SeqId big = cache.add_sequence();
  EXPECT_FALSE(cache.append(big, 16 * 7));
  EXPECT_EQ(cache.length(big), 0);
}

}  // namespace
}  // namespace nibble::cuda
