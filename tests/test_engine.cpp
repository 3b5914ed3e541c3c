// The serving engine on the CPU backend (stories260K): the KV pool's reservations, a forward pass
// whose rows do not depend on the rest of the batch, and the engine's continuous batching,
// preemption, prefix sharing, sampling and stop conditions against serial runs.
#include <gtest/gtest.h>

#include <random>

#include "nibble/backend/cpu/executor.h"
#include "nibble/core/error.h"
#include "nibble/model/model.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

#define REQUIRE_STORIES() NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors")

std::unique_ptr<Model> load_stories() { return Model::load(test::data_dir() / "models/stories260K"); }

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int64_t n, int64_t vocab) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % uint64_t(vocab));
  return t;
}

TEST(KVPool, ReserveTakesRoomThatForwardThenUses) {
  REQUIRE_STORIES();
  auto model = load_stories();
  RuntimeOptions opt;
  opt.kv_pages = 4;  // 64 tokens
  cpu::CpuExecutor exec(*model, opt);
  KVPool& kv = exec.kv();
  EXPECT_EQ(kv.capacity_tokens(), 4 * kKVPageTokens);
  const SeqId a = kv.add(), b = kv.add();
  ASSERT_TRUE(kv.reserve(a, 20));  // two pages
  EXPECT_EQ(kv.free_tokens(), 2 * kKVPageTokens);
  EXPECT_EQ(kv.length(a), 0);
  // Reservations add up: b cannot have three pages now, and a failed reserve changes nothing.
  EXPECT_FALSE(kv.reserve(b, 33));
  EXPECT_EQ(kv.free_tokens(), 2 * kKVPageTokens);
  ASSERT_TRUE(kv.reserve(b, 32));
  EXPECT_EQ(kv.free_tokens(), 0);
  // The reserved appends run; one token more for b does not (the pool is full), changing nothing.
  std::mt19937_64 rng(1);
  const auto ta = random_tokens(rng, 20, 512), tb = random_tokens(rng, 33, 512);
  std::vector<float> logits;
  const BatchEntry over[] = {{a, ta, false}, {b, tb, false}};
  EXPECT_THROW(exec.forward(over, logits), Error);
  EXPECT_EQ(kv.length(a), 0);
  const BatchEntry fits[] = {{a, ta, false}, {b, std::span(tb).first(32), false}};
  exec.forward(fits, logits);
  EXPECT_EQ(kv.length(a), 20);
  EXPECT_EQ(kv.length(b), 32);
  EXPECT_EQ(kv.free_tokens(), 0);
  // truncate and free give room back; a fork copies its parent's pages on the CPU.
  kv.truncate(b, 16);
  EXPECT_EQ(kv.free_tokens(), kKVPageTokens);
  EXPECT_THROW(kv.fork(a), Error);  // two pages, one free
  kv.free(b);
  const SeqId c = kv.fork(a);
  EXPECT_EQ(kv.length(c), 20);
  EXPECT_EQ(kv.free_tokens(), 0);
  // Past the context a reservation is refused.
  kv.free(c);
  EXPECT_FALSE(kv.reserve(a, model->config().max_position_embeddings));
}

}  // namespace
}  // namespace nibble
