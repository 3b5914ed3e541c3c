// The serving engine on the CPU backend (stories260K): the KV pool's reservations, a forward pass
// whose rows do not depend on the rest of the batch, and the engine's continuous batching,
// preemption, prefix sharing, sampling and stop conditions against serial runs.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include <fmt/format.h>

#include "nibble/backend/cpu/executor.h"
#include "nibble/core/error.h"
#include "nibble/engine/bench_load.h"
#include "nibble/engine/engine.h"
#include "nibble/model/model.h"
#include "nibble/tokenizer/tokenizer.h"
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

// A sequence's logits are the same bit for bit alone in one piece, and in any batch in any chunks.
TEST(CpuForward, SequenceLogitsDoNotDependOnTheBatch) {
  REQUIRE_STORIES();
  auto model = load_stories();
  const int64_t vocab = model->config().vocab_size;
  cpu::CpuExecutor exec(*model, {});
  KVPool& kv = exec.kv();
  std::mt19937_64 rng(3);
  const auto seq = random_tokens(rng, 41, vocab);
  std::vector<float> alone, batched;
  const SeqId a = kv.add();
  const BatchEntry whole{a, seq, false};
  exec.forward({&whole, 1}, alone);
  // The same tokens in chunks of 7, 13, 21, each step beside other sequences of other lengths.
  const SeqId b = kv.add();
  int64_t done = 0;
  for (int64_t chunk : {7, 13, 21}) {
    std::vector<std::vector<int32_t>> others;
    std::vector<BatchEntry> batch;
    for (int64_t o = 0; o < chunk % 5 + 1; ++o) others.push_back(random_tokens(rng, 1 + int64_t(rng() % 30), vocab));
    for (const auto& o : others) batch.push_back({kv.add(), o, false});
    batch.insert(batch.begin() + int64_t(rng() % batch.size()), {b, std::span(seq).subspan(size_t(done), size_t(chunk)), false});
    exec.forward(batch, batched);
    done += chunk;
    for (const BatchEntry& e : batch)
      if (e.seq != b) kv.free(e.seq);
  }
  // b's row was the last chunk's: find it among the rows by running one more, alone, to compare decode too.
  const int32_t next = 5;
  std::vector<float> alone_next, batched_next;
  const BatchEntry an{a, std::span(&next, 1), false};
  exec.forward({&an, 1}, alone_next);
  const auto filler = random_tokens(rng, 9, vocab);
  const SeqId f = kv.add();
  const BatchEntry bn[] = {{f, filler, false}, {b, std::span(&next, 1), false}};
  exec.forward(bn, batched_next);
  ASSERT_EQ(batched_next.size(), size_t(2 * vocab));
  EXPECT_EQ(0, std::memcmp(alone_next.data(), batched_next.data() + vocab, size_t(vocab) * sizeof(float)))
      << "decode logits differ inside a batch";
}

// ---- The engine against serial runs ----------------------------------------------------------

struct Finished {
  std::vector<int32_t> tokens;
  std::string text;
  FinishReason finish = FinishReason::None;
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(test::data_dir() / "models/stories260K/model.safetensors")) return;
    model_ = load_stories();
    tok_ = std::make_unique<Tokenizer>(Tokenizer::load(test::data_dir() / "models/stories260K/tokenizer.json"));
  }

  // Submits every request to one engine at once and runs it to the end.
  std::vector<Finished> run_all(const std::vector<Request>& reqs, RuntimeOptions ropt, EngineOptions eopt,
                                SchedulerStats* stats = nullptr) {
    cpu::CpuExecutor exec(*model_, ropt);
    Engine engine(exec, tok_.get(), eopt);
    std::vector<Finished> out(reqs.size());
    for (size_t i = 0; i < reqs.size(); ++i) engine.submit(reqs[i], sink(out[i]));
    engine.run();
    if (stats) *stats = engine.stats();
    return out;
  }
  // Each request alone in a fresh engine.
  std::vector<Finished> run_serial(const std::vector<Request>& reqs) {
    std::vector<Finished> out;
    for (const Request& r : reqs) out.push_back(run_all({r}, {}, {})[0]);
    return out;
  }
  static TokenSink sink(Finished& f) {
    return [&f](const OutputEvent& ev) {
      if (ev.token.id >= 0) f.tokens.push_back(ev.token.id);
      f.text += ev.text;
      if (ev.finish != FinishReason::None) f.finish = ev.finish;
    };
  }
  // `n` requests of random prompts (1..max_prompt tokens) and lengths; odd ones sample with a seed.
  std::vector<Request> random_requests(int n, int64_t max_prompt, int64_t max_out, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<Request> reqs(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      Request& r = reqs[size_t(i)];
      r.prompt = random_tokens(rng, 1 + int64_t(rng() % uint64_t(max_prompt)), model_->config().vocab_size);
      r.stop.max_tokens = 1 + int64_t(rng() % uint64_t(max_out));
      r.stop.ignore_eos = true;
      if (i % 2) r.sampling = {.temperature = 0.9f, .top_k = 50, .top_p = 0.95f, .seed = uint64_t(1000 + i)};
    }
    return reqs;
  }
  static void expect_same(const std::vector<Finished>& got, const std::vector<Finished>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << i;
      EXPECT_EQ(got[i].text, want[i].text) << "request " << i;
      EXPECT_EQ(got[i].finish, want[i].finish) << "request " << i;
    }
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(EngineTest, ConcurrentRequestsGiveWhatEachGivesAlone) {
  REQUIRE_STORIES();
  const uint64_t seed = 11;
  SCOPED_TRACE(fmt::format("seed {}", seed));
  const auto reqs = random_requests(64, 90, 40, seed);
  const auto serial = run_serial(reqs);
  SchedulerStats stats;
  // A small token budget: prompts go in chunks beside other sequences' decode steps.
  expect_same(run_all(reqs, {}, {.max_batch_tokens = 96}, &stats), serial);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(int64_t(serial[i].tokens.size()), reqs[i].stop.max_tokens);
  // The sampled requests differ from greedy ones: the seed is used.
  Request greedy = reqs[1];
  greedy.sampling = {};
  EXPECT_NE(run_serial({greedy})[0].tokens, serial[1].tokens);
}

// The CPU executor, counting which forward the engine asked for.
class CountingExecutor final : public Executor {
 public:
  explicit CountingExecutor(Executor& inner) : inner_(inner) {}
  const ModelConfig& config() const override { return inner_.config(); }
  KVPool& kv() override { return inner_.kv(); }
  std::string device_name() const override { return inner_.device_name(); }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override {
    ++logits_steps;
    inner_.forward(batch, logits);
  }
  void forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) override {
    ++greedy_steps;
    inner_.forward_greedy(batch, ids);
  }
  int logits_steps = 0, greedy_steps = 0;

 private:
  Executor& inner_;
};

// Steps whose requests are all plainly greedy take only the executor's greedy ids (a GPU then
// copies one id per row, not a row of logits); one request that asks for logprobs brings the
// logits back; the tokens are the same either way.
TEST_F(EngineTest, PlainGreedyStepsTakeOnlyTheIds) {
  REQUIRE_STORIES();
  std::vector<Request> reqs = random_requests(6, 20, 12, 5);
  for (Request& r : reqs) r.sampling = SamplingParams{};  // greedy
  cpu::CpuExecutor cpu(*model_, {});
  auto run = [&](const std::vector<Request>& rs, CountingExecutor& exec) {
    Engine engine(exec, tok_.get(), {});
    std::vector<Finished> out(rs.size());
    for (size_t i = 0; i < rs.size(); ++i) engine.submit(rs[i], sink(out[i]));
    engine.run();
    return out;
  };
  CountingExecutor greedy(cpu);
  const std::vector<Finished> ids_only = run(reqs, greedy);
  EXPECT_GT(greedy.greedy_steps, 0);
  EXPECT_EQ(greedy.logits_steps, 0);
  reqs[0].sampling.logprobs = 1;
  reqs[0].stop.max_tokens = 40;  // outlives the others: its steps run alone
  CountingExecutor mixed(cpu);
  const std::vector<Finished> with_logits = run(reqs, mixed);
  EXPECT_GT(mixed.logits_steps, 0);
  for (size_t i = 1; i < reqs.size(); ++i) EXPECT_EQ(with_logits[i].tokens, ids_only[i].tokens) << "request " << i;
  EXPECT_EQ(std::vector<int32_t>(with_logits[0].tokens.begin(), with_logits[0].tokens.begin() + ptrdiff_t(ids_only[0].tokens.size())),
            ids_only[0].tokens);
}

// An engine gives every pool sequence back when it ends (running requests, cached prefixes), so
// the executor can serve the next one.
TEST_F(EngineTest, EndingTheEngineEmptiesThePool) {
  REQUIRE_STORIES();
  RuntimeOptions opt;
  opt.kv_pages = 64;
  cpu::CpuExecutor exec(*model_, opt);
  std::vector<Finished> out(4);
  {
    Engine engine(exec, tok_.get(), {});
    const std::vector<Request> reqs = random_requests(4, 60, 10, 9);
    for (size_t i = 0; i < 3; ++i) engine.submit(reqs[i], sink(out[i]));
    engine.run();  // finished: their prompts' pages stay in the prefix cache
    engine.submit(reqs[3], sink(out[3]));
    engine.step();  // one running
    EXPECT_LT(exec.kv().free_tokens(), exec.kv().capacity_tokens());
  }
  EXPECT_EQ(exec.kv().free_tokens(), exec.kv().capacity_tokens());
}

TEST_F(EngineTest, PreemptionUnderATinyPoolLosesNothing) {
  REQUIRE_STORIES();
  const auto reqs = random_requests(24, 60, 40, 12);
  const auto serial = run_serial(reqs);
  SchedulerStats stats;
  RuntimeOptions ropt;
  ropt.kv_pages = 8;  // 128 tokens: about two sequences at a time
  expect_same(run_all(reqs, ropt, {.max_batch_tokens = 64, .prefix_caching = false}, &stats), serial);
  EXPECT_GT(stats.preemptions, 0);
  EXPECT_LE(stats.peak_pages, 8);
}

TEST_F(EngineTest, PrefixSharingSkipsTheSharedPromptAndChangesNothing) {
  REQUIRE_STORIES();
  std::mt19937_64 rng(13);
  const auto system = random_tokens(rng, 40, model_->config().vocab_size);  // two whole pages shared
  std::vector<Request> reqs(12);
  for (size_t i = 0; i < reqs.size(); ++i) {
    reqs[i].prompt = system;
    const auto own = random_tokens(rng, 1 + int64_t(rng() % 20), model_->config().vocab_size);
    reqs[i].prompt.insert(reqs[i].prompt.end(), own.begin(), own.end());
    reqs[i].stop = {.max_tokens = 10, .ignore_eos = true};
  }
  reqs[3].prompt.resize(32);  // the whole prompt is cached pages: its last token is still computed
  auto run = [&](bool sharing, SchedulerStats* stats) {
    // One request first, the rest once its prompt is in: they find it cached.
    cpu::CpuExecutor exec(*model_, {});
    Engine engine(exec, tok_.get(), {.max_batch_tokens = 512, .prefix_caching = sharing});
    std::vector<Finished> out(reqs.size());
    engine.submit(reqs[0], sink(out[0]));
    engine.step();
    for (size_t i = 1; i < reqs.size(); ++i) engine.submit(reqs[i], sink(out[i]));
    engine.run();
    *stats = engine.stats();
    return out;
  };
  SchedulerStats with, without;
  const auto a = run(true, &with), b = run(false, &without);
  expect_same(a, b);
  expect_same(a, run_serial(reqs));
  EXPECT_EQ(without.prefix_hit_tokens, 0);
  EXPECT_EQ(with.prefix_hit_tokens, 11 * 32 - 16);  // request 3 reuses one page: its last token stays
  EXPECT_EQ(with.computed_tokens, without.computed_tokens - with.prefix_hit_tokens);
}

// Prompt logprobs (completions' echo with logprobs): every prompt token's log-probability given
// the ones before it, as the model's own logits say, however the prompt is chunked, even when a
// cached prefix could have skipped its start, and through preemption.
TEST_F(EngineTest, PromptLogprobsScoreEveryPromptTokenAgainstTheModelsLogits) {
  REQUIRE_STORIES();
  const int64_t vocab = model_->config().vocab_size;
  std::mt19937_64 rng(21);
  const auto prompt = random_tokens(rng, 50, vocab);
  // The reference: one forward over the whole prompt, a row per token, log-softmax by hand.
  std::vector<double> want(prompt.size());
  {
    cpu::CpuExecutor exec(*model_, {});
    std::vector<float> logits;
    const BatchEntry whole{exec.kv().add(), prompt, true};
    exec.forward({&whole, 1}, logits);
    for (size_t i = 1; i < prompt.size(); ++i) {
      const float* row = logits.data() + int64_t(i - 1) * vocab;
      double z = 0;
      for (int64_t v = 0; v < vocab; ++v) z += std::exp(double(row[v]));
      want[i] = double(row[prompt[i]]) - std::log(z);
    }
  }
  for (const int64_t kv_pages : {int64_t(0), int64_t(6)}) {  // 6 pages: the scored request gets preempted
    SCOPED_TRACE(fmt::format("kv_pages {}", kv_pages));
    RuntimeOptions ropt;
    ropt.kv_pages = kv_pages;
    cpu::CpuExecutor exec(*model_, ropt);
    Engine engine(exec, tok_.get(), {.max_batch_tokens = 16});
    Request plain;
    plain.prompt = prompt;
    plain.stop = {.max_tokens = 8, .ignore_eos = true};
    Finished first;
    engine.submit(plain, sink(first));
    engine.run();  // its prompt's pages are cached now
    Request scored = plain;
    scored.prompt_logprobs = true;
    scored.sampling.logprobs = 2;
    // Submitted after others, it is the newest: the first preempted when the pool runs out.
    const auto others = random_requests(3, 40, 30, 22);
    std::vector<Finished> other_out(others.size());
    for (size_t i = 0; i < others.size(); ++i) engine.submit(others[i], sink(other_out[i]));
    std::vector<SampledToken> got;
    int events_with_prompt = 0;
    Finished second;
    engine.submit(scored, [&](const OutputEvent& ev) {
      if (!ev.prompt.empty()) got = ev.prompt, ++events_with_prompt;
      sink(second)(ev);
    });
    engine.run();
    EXPECT_EQ(events_with_prompt, 1);
    ASSERT_EQ(got.size(), prompt.size());
    EXPECT_EQ(got[0].token.id, prompt[0]);
    EXPECT_TRUE(std::isnan(got[0].token.logprob));
    for (size_t i = 1; i < prompt.size(); ++i) {
      EXPECT_EQ(got[i].token.id, prompt[i]) << i;
      EXPECT_NEAR(got[i].token.logprob, want[i], 1e-4) << i;
      ASSERT_EQ(got[i].top.size(), 2u) << i;
      EXPECT_GE(got[i].top[0].logprob, std::max(got[i].top[1].logprob, got[i].token.logprob)) << i;
    }
    EXPECT_EQ(second.tokens, first.tokens);  // scoring the prompt changes nothing of the answer
    if (kv_pages) {
      EXPECT_GT(engine.stats().preemptions, 0);
    }
  }
}

TEST_F(EngineTest, StopStringSplitAcrossTokensIsNeverStreamed) {
  REQUIRE_STORIES();
  Request r;
  r.prompt = tok_->encode("Once upon", true);
  r.stop.max_tokens = 30;
  const Finished full = run_all({r}, {}, {})[0];
  // A stop string made of the end of one token's text and the start of the next one's, found
  // nowhere earlier in the text.
  ASSERT_EQ(full.text[0], ' ');  // the text continues the prompt's
  size_t k = 0, at = 0;
  std::string stop;
  for (; k + 1 < full.tokens.size() && stop.empty(); ++k) {
    const size_t a = 1 + tok_->decode(std::span(full.tokens).first(k + 1)).size();  // bytes of tokens 0..k
    const size_t b = 1 + tok_->decode(std::span(full.tokens).first(k + 2)).size();
    if (a >= 8 && b >= a + 2 && full.text.find(full.text.substr(a - 2, 4)) == a - 2) {
      stop = full.text.substr(a - 2, 4);
      at = a - 2;
    }
  }
  ASSERT_FALSE(stop.empty()) << full.text;
  r.stop.stop_strings = {stop};
  std::vector<std::string> pieces;
  cpu::CpuExecutor exec(*model_, {});
  Engine engine(exec, tok_.get(), {});
  Finished got;
  engine.submit(r, [&](const OutputEvent& ev) {
    pieces.push_back(ev.text);
    sink(got)(ev);
  });
  engine.run();
  EXPECT_EQ(got.finish, FinishReason::Stop);
  EXPECT_EQ(got.text, full.text.substr(0, at)) << "stop string '" << stop << "'";
  EXPECT_EQ(got.tokens.size(), k + 1);  // it ended on the token that completed the stop string
  // The pieces streamed add up to the text: no piece carried part of the stop string.
  std::string streamed;
  for (const std::string& p : pieces) streamed += p;
  EXPECT_EQ(streamed, got.text);
}

TEST_F(EngineTest, MaxTokensEosAndStopIds) {
  REQUIRE_STORIES();
  // The model ends its stories with BOS, never EOS: the engine is told that a token the greedy
  // continuation reaches is its end-of-sequence token.
  Request r;
  r.prompt = tok_->encode("Once upon", true);
  r.stop = {.max_tokens = 40, .ignore_eos = true};
  const auto free_run = run_all({r}, {}, {})[0].tokens;
  const int32_t eos = free_run.at(6);
  const int64_t eos_at = std::find(free_run.begin(), free_run.end(), eos) - free_run.begin();
  EngineOptions with_eos{.eos_ids = {eos}};
  EXPECT_EQ(run_all({r}, {}, with_eos)[0].tokens, free_run);  // ignore_eos
  r.stop.ignore_eos = false;
  const Finished stopped = run_all({r}, {}, with_eos)[0];
  EXPECT_EQ(int64_t(stopped.tokens.size()), eos_at + 1);
  EXPECT_EQ(stopped.tokens.back(), eos);
  EXPECT_EQ(stopped.finish, FinishReason::Stop);
  Request up_to = r;  // the text is that of the tokens before EOS: EOS's own is not output
  up_to.stop.max_tokens = eos_at;
  EXPECT_EQ(stopped.text, run_all({up_to}, {}, {})[0].text);
  // max_tokens
  r.stop.max_tokens = 3;
  const Finished three = run_all({r}, {}, with_eos)[0];
  EXPECT_EQ(three.tokens.size(), 3u);
  EXPECT_EQ(three.finish, eos_at < 3 ? FinishReason::Stop : FinishReason::Length);
  // A stop id ends the request at its first occurrence.
  r.stop = {.max_tokens = 200, .stop_ids = {stopped.tokens[2]}, .ignore_eos = true};
  const Finished by_id = run_all({r}, {}, {})[0];
  EXPECT_EQ(by_id.tokens.back(), stopped.tokens[2]);
  EXPECT_LE(by_id.tokens.size(), 3u);
  EXPECT_EQ(by_id.finish, FinishReason::Stop);
}

TEST_F(EngineTest, RequestsThatCanNeverRunAreRefusedAtSubmission) {
  REQUIRE_STORIES();
  RuntimeOptions ropt;
  ropt.kv_pages = 2;  // 32 tokens
  cpu::CpuExecutor exec(*model_, ropt);
  Engine engine(exec, tok_.get(), {});
  auto refused = [&](Request r, const std::string& why) {
    try {
      engine.submit(std::move(r), [](const OutputEvent&) {});
      ADD_FAILURE() << "accepted; expected: " << why;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
  };
  Request ok;
  ok.prompt = {1, 2, 3};
  ok.stop.max_tokens = 30;  // 32 tokens cached: fits
  engine.submit(ok, [](const OutputEvent&) {});
  Request r = ok;
  r.stop.max_tokens = 31;
  refused(r, "more than the whole KV pool");
  r = ok;
  r.prompt.clear();
  refused(r, "prompt is empty");
  r = ok;
  r.prompt[1] = 512;
  refused(r, "outside the vocabulary");
  r = ok;
  r.sampling.top_p = 0;
  refused(r, "top_p");
  r = ok;
  r.stop.max_tokens = 0;
  refused(r, "max_tokens");
  r = ok;
  r.prompt.assign(500, 5);
  r.stop.max_tokens = 14;
  refused(r, "exceed the context of 512");
  engine.run();  // the accepted one still runs
}

TEST_F(EngineTest, AbortMidGenerationFreesItsPages) {
  REQUIRE_STORIES();
  cpu::CpuExecutor exec(*model_, {});
  Engine engine(exec, tok_.get(), {.prefix_caching = false});
  auto reqs = random_requests(2, 40, 1, 15);
  for (auto& r : reqs) r.stop.max_tokens = 100;
  Finished a, b;
  const RequestId ia = engine.submit(reqs[0], sink(a));
  engine.submit(reqs[1], sink(b));
  for (int i = 0; i < 5; ++i) engine.step();
  const int64_t both = engine.pages_in_use();
  const int64_t b_pages = (exec.kv().capacity_tokens() - exec.kv().free_tokens()) / kKVPageTokens;
  ASSERT_EQ(both, b_pages);
  engine.abort(ia);
  EXPECT_EQ(a.finish, FinishReason::Abort);
  EXPECT_EQ(a.tokens.size(), 5u);
  const int64_t a_len = int64_t(reqs[0].prompt.size()) + 4;
  EXPECT_EQ(engine.pages_in_use(), both - (a_len + kKVPageTokens - 1) / kKVPageTokens);
  EXPECT_THROW(engine.abort(ia), Error);
  engine.run();
  EXPECT_EQ(b.tokens.size(), 100u);
  EXPECT_EQ(engine.pages_in_use(), 0);
}

// ---- The scheduler over a pool that shares pages, as the GPU's does -----------------------------

// A stand-in for the CUDA backend: forks share whole pages (reference counted; a page is copied
// before a sequence writes into a shared one, as PageAllocator does), and the "model" answers with
// a hash of the sequence's whole history, so a lost, repeated or misplaced token shows.
class SharedPagesExecutor final : public Executor, public KVPool {
 public:
  explicit SharedPagesExecutor(int64_t pages) : refs_(size_t(pages), 0) {
    cfg_.vocab_size = 97;
    cfg_.max_position_embeddings = 1024;
  }
  const ModelConfig& config() const override { return cfg_; }
  KVPool& kv() override { return *this; }
  std::string device_name() const override { return "shared-pages fake"; }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override {
    for (const BatchEntry& e : batch) check(reserve(e.seq, int64_t(e.tokens.size())), "fake", "pool full");
    logits.assign(batch.size() * size_t(cfg_.vocab_size), 0.0f);
    for (size_t i = 0; i < batch.size(); ++i) {
      auto& t = seqs_.at(size_t(batch[i].seq)).tokens;
      t.insert(t.end(), batch[i].tokens.begin(), batch[i].tokens.end());
      uint64_t h = 1469598103934665603ull;
      for (int32_t x : t) h = (h ^ uint64_t(x)) * 1099511628211ull;
      logits[i * size_t(cfg_.vocab_size) + h % uint64_t(cfg_.vocab_size)] = 1.0f;
    }
  }

  SeqId add() override {
    seqs_.push_back({});
    return SeqId(seqs_.size() - 1);
  }
  SeqId fork(SeqId seq) override {
    Seq copy = seqs_.at(size_t(seq));
    copy.pages.resize(size_t(pages_for(int64_t(copy.tokens.size()))));
    for (int32_t p : copy.pages) ++refs_[size_t(p)];
    seqs_.push_back(std::move(copy));
    return SeqId(seqs_.size() - 1);
  }
  bool reserve(SeqId seq, int64_t n) override {
    Seq& s = seqs_.at(size_t(seq));
    const int64_t len = int64_t(s.tokens.size()), need = pages_for(len + n), have = int64_t(s.pages.size());
    int64_t take = std::max<int64_t>(0, need - have);
    for (int64_t i = len / kKVPageTokens; i < std::min(have, need); ++i) take += refs_[size_t(s.pages[size_t(i)])] > 1;
    if (take > free_pages()) return false;
    for (int64_t i = len / kKVPageTokens; i < std::min(have, need); ++i)
      if (refs_[size_t(s.pages[size_t(i)])] > 1) {
        --refs_[size_t(s.pages[size_t(i)])];
        s.pages[size_t(i)] = take_page();
      }
    while (int64_t(s.pages.size()) < need) s.pages.push_back(take_page());
    return true;
  }
  void truncate(SeqId seq, int64_t n) override {
    Seq& s = seqs_.at(size_t(seq));
    s.tokens.resize(size_t(n));
    for (size_t i = size_t(pages_for(n)); i < s.pages.size(); ++i) --refs_[size_t(s.pages[i])];
    s.pages.resize(size_t(pages_for(n)));
  }
  void free(SeqId seq) override { truncate(seq, 0); }
  int64_t length(SeqId seq) const override { return int64_t(seqs_.at(size_t(seq)).tokens.size()); }
  int64_t capacity_tokens() const override { return int64_t(refs_.size()) * kKVPageTokens; }
  int64_t free_tokens() const override { return free_pages() * kKVPageTokens; }

 private:
  struct Seq {
    std::vector<int32_t> tokens;
    std::vector<int32_t> pages;
  };
  static int64_t pages_for(int64_t tokens) { return (tokens + kKVPageTokens - 1) / kKVPageTokens; }
  int64_t free_pages() const { return std::count(refs_.begin(), refs_.end(), 0); }
  int32_t take_page() {
    const auto it = std::find(refs_.begin(), refs_.end(), 0);
    *it = 1;
    return int32_t(it - refs_.begin());
  }
  ModelConfig cfg_;
  std::vector<int> refs_;
  std::vector<Seq> seqs_;
};

TEST(EngineSharedPages, PrefixSharingUsesFewerPagesAndPreemptionLosesNothing) {
  std::mt19937_64 rng(16);
  const auto system = random_tokens(rng, 70, 97);  // four whole pages
  std::vector<Request> reqs(16);
  for (auto& r : reqs) {
    r.prompt = system;
    const auto own = random_tokens(rng, 1 + int64_t(rng() % 30), 97);
    r.prompt.insert(r.prompt.end(), own.begin(), own.end());
    r.stop.max_tokens = 1 + int64_t(rng() % 20);
  }
  auto run = [&](int64_t pages, bool sharing, SchedulerStats* stats) {
    SharedPagesExecutor exec(pages);
    Engine engine(exec, nullptr, {.max_batch_tokens = 128, .prefix_caching = sharing});
    std::vector<std::vector<int32_t>> out(reqs.size());
    auto sink = [&](size_t i) { return [&out, i](const OutputEvent& ev) { out[i].push_back(ev.token.id); }; };
    engine.submit(reqs[0], sink(0));
    engine.step();  // the first prompt is in (and cached) before the others come
    for (size_t i = 1; i < reqs.size(); ++i) engine.submit(reqs[i], sink(i));
    engine.run();
    *stats = engine.stats();
    return out;
  };
  SchedulerStats with, without, tiny;
  const auto want = run(1000, false, &without);
  EXPECT_EQ(run(1000, true, &with), want);
  EXPECT_EQ(with.prefix_hit_tokens, 15 * 64);
  EXPECT_LT(with.peak_pages, without.peak_pages);  // running requests share the 4 pages
  EXPECT_EQ(with.computed_tokens, without.computed_tokens - with.prefix_hit_tokens);
  // 12 pages: about two sequences at a time, the cached prefix evicted and taken again.
  EXPECT_EQ(run(12, true, &tiny), want);
  EXPECT_GT(tiny.preemptions, 0);
  EXPECT_LE(tiny.peak_pages, 12);
}

// The benchmarks' load (engine/bench_load.h), against what Atom's bench_textgen.py states: prompts
// of a lognormal(0.8, loc -1, scale 18) clamped to [1, maxlen - 2] average 18·e^0.32 - 1 ≈ 23.8
// tokens; totals uniform in [0, 2048) (at least prompt + 2) make outputs average ≈ 1000; Poisson
// gaps average 1/rate. The same seed gives the same load.
TEST(BenchLoad, AtomLengthsAndPoissonArrivalsHaveTheirMeans) {
  const LoadSpec spec{.num_prompts = 20000, .dist = "atom", .max_len = 2048, .vocab = 100, .rate = 4, .seed = 11};
  const std::vector<SyntheticRequest> load = synthetic_requests(spec);
  ASSERT_EQ(load.size(), 20000u);
  double prompt = 0, output = 0;
  for (const SyntheticRequest& r : load) {
    ASSERT_GE(r.prompt.size(), 1u);
    ASSERT_LE(r.prompt.size(), 2046u);
    ASSERT_GE(r.output_len, 2);
    ASSERT_LE(int64_t(r.prompt.size()) + r.output_len, 2047);
    for (int32_t t : r.prompt) ASSERT_TRUE(t >= 0 && t < 100) << t;
    prompt += double(r.prompt.size());
    output += double(r.output_len);
  }
  EXPECT_NEAR(prompt / 20000, 18 * std::exp(0.32) - 1 - 0.5, 1.0);  // int() truncation takes ~0.5
  EXPECT_NEAR(output / 20000, 1000, 25);
  EXPECT_NEAR(load.back().arrival_s / 20000, 0.25, 0.01);
  const auto again = synthetic_requests(spec);
  EXPECT_EQ(again[123].prompt, load[123].prompt);
  EXPECT_EQ(again[123].arrival_s, load[123].arrival_s);
  const auto fixed = synthetic_requests({.num_prompts = 3, .prompt_len = 5, .output_len = 7, .vocab = 9});
  for (const SyntheticRequest& r : fixed) {
    EXPECT_EQ(r.prompt.size(), 5u);
    EXPECT_EQ(r.output_len, 7);
    EXPECT_EQ(r.arrival_s, 0);  // rate 0: all at once
  }
  EXPECT_THROW(synthetic_requests({.dist = "zipf", .vocab = 9}), Error);
}

}  // namespace
}  // namespace nibble
