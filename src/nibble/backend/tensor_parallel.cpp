#include "nibble/backend/tensor_parallel.h"

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "nibble/backend/sampling.h"
#include "nibble/backend/shard_plan.h"
#include "nibble/core/error.h"
#if NIBBLE_HAVE_CUDA
#include "nibble/backend/cuda/executor.h"
#endif

namespace nibble {

namespace {

constexpr const char* kWhere = "tensor parallel";

[[noreturn]] void abandoned() {
  throw CollectiveAborted(kWhere, "another rank of the group failed; this step is abandoned");
}

// What the ranks of one host group share: a generation barrier and each rank's buffer of the
// collective in progress.
class HostGroup {
 public:
  explicit HostGroup(int world) : world_(world), sent_(size_t(world)) {}
  int world() const { return world_; }

  // Publishes rank's buffer and waits for every rank's (they stay valid until the next wait).
  void exchange(int rank, const float* x) {
    sent_[size_t(rank)] = x;
    wait();
  }
  const float* sent(int rank) const { return sent_[size_t(rank)]; }

  void wait() {
    std::unique_lock lock(mutex_);
    if (aborted_) abandoned();
    const uint64_t generation = generation_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
    if (generation_ == generation) abandoned();
  }

  void abort() {
    std::lock_guard lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  const int world_;
  std::vector<const float*> sent_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool aborted_ = false;
};

class HostCommunicator final : public Communicator {
 public:
  HostCommunicator(std::shared_ptr<HostGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}
  int rank() const override { return rank_; }
  int world() const override { return group_->world(); }

  void all_reduce_sum(float* x, int64_t n) override {
    group_->exchange(rank_, x);
    sum_.assign(size_t(n), 0.0f);
    for (int r = 0; r < world(); ++r) {
      const float* p = group_->sent(r);
      for (int64_t i = 0; i < n; ++i) sum_[size_t(i)] += p[i];
    }
    group_->wait();  // every rank has read every x before any is overwritten
    std::copy(sum_.begin(), sum_.end(), x);
  }

  void all_gather(const float* x, int64_t n, float* out) override {
    group_->exchange(rank_, x);
    for (int r = 0; r < world(); ++r) std::copy_n(group_->sent(r), n, out + r * n);
    group_->wait();
  }

  void abort() override { group_->abort(); }

 private:
  std::shared_ptr<HostGroup> group_;
  int rank_;
  std::vector<float> sum_;
};

// The group's one pool: every call goes to each rank's pool, which must answer alike.
class MirroredKVPool final : public KVPool {
 public:
  explicit MirroredKVPool(std::vector<KVPool*> pools) : pools_(std::move(pools)) {}

  // call(pool) on every pool; each must answer as rank 0's did.
  template <typename F>
  auto same(const char* what, F&& call) -> decltype(call(std::declval<KVPool&>())) {
    const auto first = call(*pools_[0]);
    for (size_t r = 1; r < pools_.size(); ++r)
      check(call(*pools_[r]) == first, kWhere, "rank {}'s KV pool answered {} differently from rank 0's", r, what);
    return first;
  }

  SeqId add() override {
    return same("add", [](KVPool& p) { return p.add(); });
  }
  SeqId fork(SeqId seq) override {
    return same("fork", [&](KVPool& p) { return p.fork(seq); });
  }
  bool reserve(SeqId seq, int64_t n_new) override {
    return same("reserve", [&](KVPool& p) { return p.reserve(seq, n_new); });
  }
  void truncate(SeqId seq, int64_t n) override {
    for (KVPool* p : pools_) p->truncate(seq, n);
  }
  void free(SeqId seq) override {
    for (KVPool* p : pools_) p->free(seq);
  }
  int64_t length(SeqId seq) const override { return pools_[0]->length(seq); }
  int64_t capacity_tokens() const override { return pools_[0]->capacity_tokens(); }
  int64_t free_tokens() const override { return pools_[0]->free_tokens(); }

 private:
  std::vector<KVPool*> pools_;
};

class TensorParallelExecutor final : public Executor {
 public:
  TensorParallelExecutor(const Model& model, const RuntimeOptions& opt)
      : config_(model.config()), plan_(model, opt.tp) {
    RuntimeOptions rank_opt = opt;
    rank_opt.tp = 1;
    if (opt.device == "cpu") {
      for (int r = 0; r < opt.tp; ++r) {
        shards_.push_back(shard_model(model, plan_, r));
        ranks_.push_back(make_executor(*shards_.back(), rank_opt));
      }
      connect();
    } else {
      // The device's own collectives (NCCL) join the ranks; the shard's placement steers them. Each
      // shard is dropped once its weights are on its GPU.
      auto shard = [&](int r) {
        std::unique_ptr<Model> s = shard_model(model, plan_, r);
        s->set_tensor_parallel(plan_.placement(r, nullptr));
        return s;
      };
#if NIBBLE_HAVE_CUDA
      ranks_ = cuda::make_tensor_parallel_ranks(opt.tp, shard, rank_opt);
#endif
    }
    std::vector<KVPool*> pools;
    for (auto& rank : ranks_) pools.push_back(&rank->kv());
    pool_ = std::make_unique<MirroredKVPool>(std::move(pools));
  }

  const ModelConfig& config() const override { return config_; }
  KVPool& kv() override { return *pool_; }
  std::string device_name() const override {
    return fmt::format("{} x{} (tensor parallel)", ranks_[0]->device_name(), ranks_.size());
  }

  // Every rank ends its step with the whole vocabulary's logits (gathered), so each picks the
  // same tokens: rank 0's are returned.
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override {
    std::vector<std::vector<float>> out(ranks_.size());
    run_ranks([&](size_t r) { ranks_[r]->forward(batch, out[r]); });
    logits = std::move(out[0]);
  }
  void forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) override {
    std::vector<std::vector<int32_t>> out(ranks_.size());
    run_ranks([&](size_t r) { ranks_[r]->forward_greedy(batch, out[r]); });
    ids = std::move(out[0]);
  }
  void forward_sample(std::span<const BatchEntry> batch, std::span<const RowSampling> rows, SampledRows& out) override {
    std::vector<SampledRows> each(ranks_.size());
    run_ranks([&](size_t r) { ranks_[r]->forward_sample(batch, rows, each[r]); });
    out = std::move(each[0]);
  }

 private:
  // A fresh group of host communicators for the CPU shards (at the start and after a failed step).
  void connect() {
    comms_ = make_host_communicators(int(ranks_.size()));
    for (size_t r = 0; r < shards_.size(); ++r)
      shards_[r]->set_tensor_parallel(plan_.placement(int(r), comms_[r].get()));
  }

  // Runs step(r) for every rank, rank 0 on this thread. The first failure aborts the group (the
  // others leave their collectives) and is rethrown here once every rank has stopped.
  void run_ranks(const std::function<void(size_t)>& step) {
    std::vector<std::exception_ptr> failed(ranks_.size());
    auto run = [&](size_t r) {
      try {
        step(r);
      } catch (...) {
        failed[r] = std::current_exception();
        if (!comms_.empty()) comms_[r]->abort();  // a device rank aborts its own group (NCCL)
      }
    };
    {
      std::vector<std::jthread> threads;
      for (size_t r = 1; r < ranks_.size(); ++r) threads.emplace_back(run, r);
      run(0);
    }
    // A rank's own error says what went wrong; the aborted collectives of the others only echo it.
    std::exception_ptr first;
    for (const std::exception_ptr& f : failed) {
      if (!f) continue;
      try {
        std::rethrow_exception(f);
      } catch (const CollectiveAborted&) {
        if (!first) first = f;
      } catch (...) {
        first = f;
        break;
      }
    }
    if (!first) return;
    if (!comms_.empty()) connect();
    std::rethrow_exception(first);
  }

  ModelConfig config_;
  ShardPlan plan_;
  std::vector<std::unique_ptr<Model>> shards_;
  std::vector<std::unique_ptr<Executor>> ranks_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::unique_ptr<MirroredKVPool> pool_;
};

}  // namespace

std::vector<std::unique_ptr<Communicator>> make_host_communicators(int world) {
  auto group = std::make_shared<HostGroup>(world);
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < world; ++r) comms.push_back(std::make_unique<HostCommunicator>(group, r));
  return comms;
}

std::unique_ptr<Executor> make_tensor_parallel_executor(const Model& model, const RuntimeOptions& opt) {
  if (opt.device != "cpu") {
    check(opt.device == "cuda", "--device", "unknown device '{}' (cpu or cuda)", opt.device);
    std::string why;
    check(cuda_device_available(&why), "--device cuda", "{}", why);
  }
  return std::make_unique<TensorParallelExecutor>(model, opt);
}

}  // namespace nibble
