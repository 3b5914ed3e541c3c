#include "nibble/eval/zero_shot.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>

#include <fmt/format.h>

#include "nibble/core/error.h"
#include "nibble/core/progress.h"
#include "nibble/eval/perplexity.h"
#include "nibble/tokenizer/tokenizer.h"

namespace nibble {

namespace fs = std::filesystem;
using json = nlohmann::json;

const char* protocol_name(LLProtocol p) { return p == LLProtocol::Harness04 ? "lm-eval-0.4" : "lm-eval-0.3"; }

LLProtocol parse_protocol(const std::string& s) {
  if (s == "lm-eval-0.4" || s == "0.4" || s == "harness04") return LLProtocol::Harness04;
  if (s == "lm-eval-0.3" || s == "0.3" || s == "atom" || s == "harness03") return LLProtocol::Harness03;
  throw Error("--protocol", fmt::format("unknown protocol '{}' (lm-eval-0.4 or lm-eval-0.3)", s));
}

TokenizedRequest tokenize_request(const LLRequest& r, const EncodeFn& encode, int32_t bos, LLProtocol p) {
  TokenizedRequest t;
  if (p == LLProtocol::Harness03) {
    // BaseLM.loglikelihood: context_enc = tok_encode(context) (or [eot] for ""), continuation_enc =
    // tok_encode(continuation); Atom's tok_encode is encode(string, add_special_tokens=False).
    if (r.context.empty()) {
      check(bos >= 0, "zero-shot", "an empty context needs a BOS/EOT token and the tokenizer has none");
      t.context = {bos};
    } else {
      t.context = encode(r.context, false);
    }
    t.continuation = encode(r.continuation, false);
    return t;
  }
  // HFLM._encode_pair (lm-eval >= 0.4), encoding with the tokenizer's default special tokens.
  const bool add_bos = true;
  if (r.context.empty()) {
    check(bos >= 0, "zero-shot", "an empty context needs a BOS token and the tokenizer has none");
    t.context = {bos};
    t.continuation = encode(r.continuation, false);
    return t;
  }
  std::string context = r.context, continuation = r.continuation;
  const size_t kept = py_rstrip(context).size();
  if (kept < context.size()) {
    continuation = context.substr(kept) + continuation;
    context.resize(kept);
  }
  std::vector<int32_t> whole = encode(context + continuation, add_bos);
  t.context = encode(context, add_bos);
  const size_t n = std::min(t.context.size(), whole.size());
  t.continuation.assign(whole.begin() + int64_t(n), whole.end());
  return t;
}

// ---------------------------------------------------------------------------------------------
// Scoring.

namespace {

// One choice after lm-eval's left truncation.
struct Prepared {
  std::vector<int32_t> seq;  // (context + continuation)[-(max_length + 1):]
  int64_t ctx_len = 0;       // tokens of seq before the (scored part of the) continuation
  bool cut = false;          // the continuation itself was longer than the window
};

struct GroupPlan {
  std::vector<Prepared> choices;
  int64_t prefix = 0;   // shared input tokens forwarded once
};

GroupPlan plan_group(const std::vector<TokenizedRequest>& reqs, int64_t max_length) {
  GroupPlan g;
  check(!reqs.empty(), "zero-shot", "a question needs at least one choice");
  for (const TokenizedRequest& r : reqs) {
    check(!r.continuation.empty(), "zero-shot", "a continuation encoded to no tokens");
    check(!r.context.empty(), "zero-shot", "a context encoded to no tokens");
    Prepared p;
    p.seq = r.context;
    p.seq.insert(p.seq.end(), r.continuation.begin(), r.continuation.end());
    if (int64_t(p.seq.size()) > max_length + 1) p.seq.erase(p.seq.begin(), p.seq.end() - (max_length + 1));
    // A continuation longer than the window (lm-eval asserts here) keeps its last max_length
    // tokens scored, the token before them serving as the only context.
    p.ctx_len = std::max<int64_t>(1, int64_t(p.seq.size()) - int64_t(r.continuation.size()));
    p.cut = int64_t(r.continuation.size()) > max_length;
    g.choices.push_back(std::move(p));
  }
  // The input of a choice is seq[0 : len-1]; the shared prefix is the longest common prefix of
  // the inputs, cut at the shortest context so that every scored row lies at or after its end.
  int64_t prefix = g.choices[0].ctx_len;
  for (const Prepared& p : g.choices) prefix = std::min(prefix, p.ctx_len);
  const auto& first = g.choices[0].seq;
  for (const Prepared& p : g.choices) {
    int64_t k = 0;
    while (k < prefix && p.seq[size_t(k)] == first[size_t(k)]) ++k;
    prefix = k;
  }
  g.prefix = prefix;
  return g;
}

// The sequences one batch adds to an executor's KV pool, freed when it is done (or has failed).
class BatchSequences {
 public:
  explicit BatchSequences(KVPool& kv) : kv_(kv) {}
  ~BatchSequences() {
    for (SeqId s : seqs_) kv_.free(s);
  }
  BatchSequences(const BatchSequences&) = delete;
  BatchSequences& operator=(const BatchSequences&) = delete;
  SeqId add() { return seqs_.emplace_back(kv_.add()); }
  SeqId fork(SeqId seq) { return seqs_.emplace_back(kv_.fork(seq)); }

 private:
  KVPool& kv_;
  std::vector<SeqId> seqs_;
};

// The logits of `batch` (rows in batch order) from forward calls of at most `max_tokens` tokens
// each (0: one call); an entry is never split.
std::vector<float> forward_batch(Executor& exec, std::span<const BatchEntry> batch, int64_t max_tokens) {
  std::vector<float> logits, part;
  for (size_t b0 = 0, b1; b0 < batch.size(); b0 = b1) {
    int64_t n = 0;
    for (b1 = b0; b1 < batch.size(); ++b1) {
      const int64_t t = int64_t(batch[b1].tokens.size());
      if (b1 > b0 && max_tokens > 0 && n + t > max_tokens) break;
      n += t;
    }
    exec.forward(batch.subspan(b0, b1 - b0), part);
    if (logits.empty()) logits.swap(part);
    else logits.insert(logits.end(), part.begin(), part.end());
  }
  return logits;
}

// The CPU reference executor of `model`, its sequences as long as the scoring window.
std::unique_ptr<Executor> cpu_executor(Model& model, const ScoreOptions& opt) {
  RuntimeOptions cpu;
  cpu.max_context = opt.window(model.config());
  return make_executor(model, cpu);
}

// Adds log p(target | row) and whether target is the row's argmax (first maximum, as torch).
void score_row(const float* row, int64_t V, int32_t target, std::vector<double>& lp, double* sum, bool* greedy) {
  log_softmax(row, V, lp.data());
  *sum += lp[size_t(target)];
  const int64_t arg = std::max_element(row, row + V) - row;
  if (arg != target) *greedy = false;
}

}  // namespace

std::vector<std::vector<LLResult>> score_loglikelihood(Model& model,
                                                       std::span<const std::vector<TokenizedRequest>> groups,
                                                       const ScoreOptions& opt,
                                                       const std::function<void(int64_t)>& on_group_done,
                                                       int64_t* tokens_forwarded) {
  return score_loglikelihood(*cpu_executor(model, opt), groups, opt, on_group_done, tokens_forwarded);
}

std::vector<std::vector<LLResult>> score_loglikelihood(Executor& exec,
                                                       std::span<const std::vector<TokenizedRequest>> groups,
                                                       const ScoreOptions& opt,
                                                       const std::function<void(int64_t)>& on_group_done,
                                                       int64_t* tokens_forwarded) {
  const ModelConfig& c = exec.config();
  const int64_t V = c.vocab_size;
  const int64_t max_length = opt.window(c);
  check(max_length <= c.max_position_embeddings, "zero-shot", "--ctx {} is beyond the model's {} positions", max_length,
        c.max_position_embeddings);
  const int64_t batch_docs = std::max<int64_t>(1, opt.batch_docs);
  const int64_t batch_tokens = std::max<int64_t>(1, opt.batch_tokens);
  // Every choice token returns a logits row: keep one batch's rows within 256 MB of fp32.
  const int64_t choice_budget = std::max<int64_t>(1, std::min(batch_tokens, (int64_t(64) << 20) / V));

  std::vector<std::vector<LLResult>> out(groups.size());
  int64_t forwarded = 0;
  size_t g0 = 0;
  while (g0 < groups.size()) {
    // Gather a batch of questions within the token budgets.
    std::vector<GroupPlan> plans;
    int64_t prefix_tokens = 0, choice_tokens = 0;
    size_t g1 = g0;
    while (g1 < groups.size() && int64_t(plans.size()) < batch_docs) {
      GroupPlan p = plan_group(groups[g1], max_length);
      int64_t ct = 0;
      for (const Prepared& ch : p.choices) ct += int64_t(ch.seq.size()) - 1 - p.prefix;
      if (!plans.empty() && (prefix_tokens + p.prefix > batch_tokens || choice_tokens + ct > choice_budget)) break;
      prefix_tokens += p.prefix;
      choice_tokens += ct;
      plans.push_back(std::move(p));
      ++g1;
    }

    // Phase 1: every shared prefix, one batch, last logits row only.
    BatchSequences seqs(exec.kv());
    std::vector<SeqId> prefix_seq(plans.size());
    std::vector<BatchEntry> steps;
    std::vector<size_t> prefix_row(plans.size(), size_t(-1));
    for (size_t k = 0; k < plans.size(); ++k) {
      prefix_seq[k] = seqs.add();
      if (plans[k].prefix == 0) continue;
      prefix_row[k] = steps.size();
      steps.push_back(
          {prefix_seq[k], std::span<const int32_t>(plans[k].choices[0].seq.data(), size_t(plans[k].prefix)), false});
    }
    std::vector<float> prefix_logits;
    if (!steps.empty()) prefix_logits = forward_batch(exec, steps, opt.max_forward_tokens);
    forwarded += prefix_tokens;

    // Phase 2: each choice's own tokens on a fork of its question's prefix, all logits.
    steps.clear();
    struct Where {
      size_t plan, choice;
      int64_t row = -1;  // first logits row of this choice in phase 2 (-1: nothing forwarded)
    };
    std::vector<Where> where;
    int64_t rows = 0;
    for (size_t k = 0; k < plans.size(); ++k)
      for (size_t i = 0; i < plans[k].choices.size(); ++i) {
        const Prepared& ch = plans[k].choices[i];
        const int64_t n = int64_t(ch.seq.size()) - 1 - plans[k].prefix;
        Where w{k, i};
        if (n > 0) {
          steps.push_back(
              {seqs.fork(prefix_seq[k]), std::span<const int32_t>(ch.seq.data() + plans[k].prefix, size_t(n)), true});
          w.row = rows;
          rows += n;
        }
        where.push_back(w);
      }
    std::vector<float> choice_logits;
    if (!steps.empty()) choice_logits = forward_batch(exec, steps, opt.max_forward_tokens);
    forwarded += choice_tokens;

    // Log-likelihoods in float64.
    std::vector<LLResult> flat(where.size());
#pragma omp parallel
    {
      std::vector<double> lp(static_cast<size_t>(V));
#pragma omp for schedule(dynamic)
      for (int64_t w = 0; w < int64_t(where.size()); ++w) {
        const Where& wh = where[size_t(w)];
        const GroupPlan& p = plans[wh.plan];
        const Prepared& ch = p.choices[wh.choice];
        double sum = 0;
        bool greedy = true;
        // Position r's row predicts seq[r + 1]; the continuation is seq[ctx_len:].
        for (int64_t r = ch.ctx_len - 1; r + 1 < int64_t(ch.seq.size()); ++r) {
          const float* row = r == p.prefix - 1
                                 ? prefix_logits.data() + int64_t(prefix_row[wh.plan]) * V
                                 : choice_logits.data() + (wh.row + (r - p.prefix)) * V;
          score_row(row, V, ch.seq[size_t(r + 1)], lp, &sum, &greedy);
        }
        flat[size_t(w)] = {sum, greedy, ch.cut};
      }
    }
    for (size_t w = 0; w < where.size(); ++w) {
      auto& dst = out[g0 + where[w].plan];
      if (dst.empty()) dst.resize(plans[where[w].plan].choices.size());
      dst[where[w].choice] = flat[w];
    }
    g0 = g1;
    if (on_group_done) on_group_done(int64_t(g0));
  }
  if (tokens_forwarded) *tokens_forwarded = forwarded;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Metrics and tasks.

double mean_stderr(std::span<const double> xs) {
  const size_t n = xs.size();
  if (n < 2) return 0;
  double mu = 0;
  for (double x : xs) mu += x;
  mu /= double(n);
  double ss = 0;
  for (double x : xs) ss += (x - mu) * (x - mu);
  return std::sqrt(ss / double(n - 1)) / std::sqrt(double(n));
}

namespace {

// Python's random.Random: MT19937 seeded by init_by_array over the 32-bit words of the integer
// seed, getrandbits and the rejection-sampling _randbelow that random.shuffle uses.
class PyRandom {
 public:
  explicit PyRandom(uint64_t seed) {
    std::vector<uint32_t> key;
    for (uint64_t s = seed; s != 0; s >>= 32) key.push_back(uint32_t(s & 0xffffffffu));
    if (key.empty()) key.push_back(0);
    init_by_array(key);
  }
  uint32_t next() {
    if (i_ >= kN) twist();
    uint32_t y = mt_[size_t(i_++)];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
  }
  uint64_t below(uint64_t n) {  // _randbelow_with_getrandbits, n < 2^32
    int k = 0;
    while ((uint64_t(1) << k) <= n) ++k;  // n.bit_length()
    uint64_t r;
    do r = next() >> (32 - k); while (r >= n);
    return r;
  }

 private:
  static constexpr int kN = 624, kM = 397;
  void init_genrand(uint32_t s) {
    mt_[0] = s;
    for (int i = 1; i < kN; ++i) mt_[size_t(i)] = 1812433253u * (mt_[size_t(i - 1)] ^ (mt_[size_t(i - 1)] >> 30)) + uint32_t(i);
    i_ = kN;
  }
  void init_by_array(const std::vector<uint32_t>& key) {
    init_genrand(19650218u);
    int i = 1;
    size_t j = 0;
    for (int k = std::max<int>(kN, int(key.size())); k > 0; --k) {
      mt_[size_t(i)] = (mt_[size_t(i)] ^ ((mt_[size_t(i - 1)] ^ (mt_[size_t(i - 1)] >> 30)) * 1664525u)) + key[j] + uint32_t(j);
      ++i;
      ++j;
      if (i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
      if (j >= key.size()) j = 0;
    }
    for (int k = kN - 1; k > 0; --k) {
      mt_[size_t(i)] = (mt_[size_t(i)] ^ ((mt_[size_t(i - 1)] ^ (mt_[size_t(i - 1)] >> 30)) * 1566083941u)) - uint32_t(i);
      if (++i >= kN) {
        mt_[0] = mt_[kN - 1];
        i = 1;
      }
    }
    mt_[0] = 0x80000000u;
  }
  void twist() {
    for (int k = 0; k < kN; ++k) {
      const uint32_t y = (mt_[size_t(k)] & 0x80000000u) | (mt_[size_t((k + 1) % kN)] & 0x7fffffffu);
      mt_[size_t(k)] = mt_[size_t((k + kM) % kN)] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    i_ = 0;
  }
  uint32_t mt_[kN];
  int i_ = kN;
};

}  // namespace

std::vector<int64_t> python_shuffled(int64_t n, uint64_t seed) {
  std::vector<int64_t> x(static_cast<size_t>(n));
  std::iota(x.begin(), x.end(), 0);
  PyRandom rng(seed);
  for (int64_t i = n - 1; i > 0; --i) std::swap(x[size_t(i)], x[size_t(rng.below(uint64_t(i + 1)))]);
  return x;
}

std::vector<int64_t> select_docs(int64_t n, int64_t limit, uint64_t seed) {
  if (limit <= 0 || limit >= n) {
    std::vector<int64_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
  // lm-eval 0.3.0's evaluator: random.Random(42).shuffle(docs), then the first `limit`.
  std::vector<int64_t> idx = python_shuffled(n, seed);
  idx.resize(size_t(limit));
  std::sort(idx.begin(), idx.end());
  return idx;
}

fs::path default_tasks_dir() {
  if (const char* env = std::getenv("NIBBLE_DATA"); env && *env) return fs::path(env) / "tasks";
  // The running binary's folder first: a checkout's build/bin/nibble finds the shared/ beside the
  // checkout from whatever folder it is run in.
  std::error_code ec;
  for (const fs::path& start : {fs::read_symlink("/proc/self/exe", ec).parent_path(), fs::current_path(ec)}) {
    for (fs::path d = start; !d.empty(); d = d.parent_path()) {
      if (fs::is_directory(d / "shared/data/tasks", ec)) return d / "shared/data/tasks";
      if (d == d.parent_path()) break;
    }
  }
  return "../shared/data/tasks";
}

double TaskResult::atom_value() const { return info.has_acc_norm && info.atom_metric == "acc_norm" ? acc_norm : acc; }
double TaskResult::atom_stderr() const {
  return info.has_acc_norm && info.atom_metric == "acc_norm" ? acc_norm_stderr : acc_stderr;
}

json TaskResult::to_json() const {
  json j = {{"n", n}, {"total", total}, {"acc", acc}, {"acc_stderr", acc_stderr}, {"tokens", tokens},
            {"seconds", seconds}, {"source", source}, {"split", info.split}};
  if (info.has_acc_norm) {
    j["acc_norm"] = acc_norm;
    j["acc_norm_stderr"] = acc_norm_stderr;
  }
  if (info.kind == TaskKind::LastWord) j["ppl"] = ppl;
  if (!info.atom_metric.empty()) j["atom_metric"] = info.atom_metric;
  if (!note.empty()) j["note"] = note;
  if (truncated) j["truncated_continuations"] = truncated;
  return j;
}

TaskResult evaluate_task(Model& model, const EncodeFn& encode, int32_t bos, const Task& task,
                         const ZeroShotOptions& opt) {
  return evaluate_task(*cpu_executor(model, opt.score), encode, bos, task, opt);
}

TaskResult evaluate_task(Executor& exec, const EncodeFn& encode, int32_t bos, const Task& task,
                         const ZeroShotOptions& opt) {
  TaskResult r;
  r.info = task.info;
  r.source = task.source;
  r.note = task.note;
  r.total = int64_t(task.docs.size());
  r.doc_indices = select_docs(r.total, opt.limit, opt.seed);
  r.n = int64_t(r.doc_indices.size());
  check(r.n > 0, task.source, "task '{}' has no docs to score", task.info.name);

  std::vector<std::vector<TokenizedRequest>> groups;
  groups.reserve(size_t(r.n));
  for (int64_t d : r.doc_indices) {
    std::vector<TokenizedRequest> g;
    for (const LLRequest& q : task.docs[size_t(d)].choices) g.push_back(tokenize_request(q, encode, bos, opt.protocol));
    groups.push_back(std::move(g));
  }

  const auto t0 = std::chrono::steady_clock::now();
  std::optional<Progress> progress;
  if (opt.show_progress) progress.emplace(task.info.name, r.n, "docs");
  const auto results = score_loglikelihood(
      exec, groups, opt.score, [&](int64_t done) { if (progress) progress->update(done); }, &r.tokens);

  std::vector<double> acc, acc_norm;
  double ll_sum = 0;
  for (size_t k = 0; k < results.size(); ++k) {
    const TaskDoc& doc = task.docs[size_t(r.doc_indices[k])];
    std::vector<double> lls;
    for (const LLResult& x : results[k]) {
      lls.push_back(x.logprob);
      r.truncated += x.truncated;
    }
    r.logliks.push_back(lls);
    if (task.info.kind == TaskKind::LastWord) {
      acc.push_back(results[k][0].is_greedy ? 1.0 : 0.0);
      ll_sum += results[k][0].logprob;
      continue;
    }
    // np.argmax: the first maximum.
    const auto best = std::max_element(lls.begin(), lls.end()) - lls.begin();
    acc.push_back(best == doc.gold ? 1.0 : 0.0);
    if (task.info.has_acc_norm) {
      int64_t bn = 0;
      for (size_t i = 1; i < lls.size(); ++i)
        if (lls[i] / doc.norm_lengths[i] > lls[size_t(bn)] / doc.norm_lengths[size_t(bn)]) bn = int64_t(i);
      acc_norm.push_back(bn == doc.gold ? 1.0 : 0.0);
    }
  }
  auto mean = [](const std::vector<double>& v) { return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / double(v.size()); };
  r.acc = mean(acc);
  r.acc_stderr = mean_stderr(acc);
  if (task.info.has_acc_norm) {
    r.acc_norm = mean(acc_norm);
    r.acc_norm_stderr = mean_stderr(acc_norm);
  }
  if (task.info.kind == TaskKind::LastWord) r.ppl = std::exp(-ll_sum / double(r.n));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (progress) {
    progress->finish(task.info.has_acc_norm ? fmt::format("acc {:.4f}, acc_norm {:.4f}", r.acc, r.acc_norm)
                     : task.info.kind == TaskKind::LastWord ? fmt::format("acc {:.4f}, ppl {:.3f}", r.acc, r.ppl)
                                                            : fmt::format("acc {:.4f}", r.acc));
  }
  return r;
}

ZeroShotResults evaluate_tasks(Model& model, const Tokenizer& tokenizer, std::span<const std::string> tasks,
                               const ZeroShotOptions& opt) {
  ZeroShotResults res = evaluate_tasks(*cpu_executor(model, opt.score), tokenizer, tasks, opt);
  res.model = model.source();
  return res;
}

ZeroShotResults evaluate_tasks(Executor& exec, const Tokenizer& tokenizer, std::span<const std::string> tasks,
                               const ZeroShotOptions& opt) {
  const EncodeFn encode = [&tokenizer](const std::string& text, bool add_bos) { return tokenizer.encode(text, add_bos); };
  return evaluate_tasks(exec, encode, tokenizer.bos_id(), tasks, opt);
}

ZeroShotResults evaluate_tasks(Executor& exec, const EncodeFn& encode, int32_t bos, std::span<const std::string> tasks,
                               const ZeroShotOptions& opt) {
  ZeroShotResults res;
  res.device = exec.device_name();
  res.protocol = protocol_name(opt.protocol);
  res.limit = opt.limit;
  res.seed = opt.seed;
  res.max_length = opt.score.window(exec.config());
  for (const std::string& name : tasks) task_info(name);  // unknown names fail before any work
  for (const std::string& name : tasks) {
    if (!task_available(name, opt.tasks_dir)) {
      res.unavailable.push_back(fmt::format("{}: no data under {} (needs {})", name, opt.tasks_dir.string(),
                                            fmt::join(task_files(name), " or ")));
      continue;
    }
    const Task task = load_task(name, opt.tasks_dir);
    res.tasks.push_back(evaluate_task(exec, encode, bos, task, opt));
  }
  double sum = 0;
  for (const TaskResult& r : res.tasks)
    if (!r.info.atom_metric.empty()) {
      sum += r.atom_value();
      ++res.average_tasks;
    }
  res.average = res.average_tasks > 0 ? sum / res.average_tasks : 0;
  return res;
}

// ---------------------------------------------------------------------------------------------
// Output.

json ZeroShotResults::to_json() const {
  json j;
  j["results"] = json::object();
  for (const TaskResult& r : tasks) j["results"][r.info.name] = r.to_json();
  j["average"] = {{"value", average}, {"tasks", average_tasks},
                  {"rule", "Atom / lm-eval 0.3.0 0-shot: acc_norm for piqa, arc_easy, arc_challenge, hellaswag; "
                           "acc for boolq, winogrande"}};
  j["config"] = {{"model", model}, {"device", device}, {"protocol", protocol}, {"limit", limit}, {"max_length", max_length},
                 {"num_fewshot", 0}};
  j["config"]["seed"] = seed;
  j["unavailable"] = unavailable;
  return j;
}

std::string ZeroShotResults::to_csv() const {
  std::string s = "task,n,total,acc,acc_stderr,acc_norm,acc_norm_stderr,ppl,atom_metric,atom_value,tokens,seconds\n";
  for (const TaskResult& r : tasks) {
    s += fmt::format("{},{},{},{:.6f},{:.6f},", r.info.name, r.n, r.total, r.acc, r.acc_stderr);
    s += r.info.has_acc_norm ? fmt::format("{:.6f},{:.6f},", r.acc_norm, r.acc_norm_stderr) : ",,";
    s += r.info.kind == TaskKind::LastWord ? fmt::format("{:.6f},", r.ppl) : ",";
    s += fmt::format("{},{:.6f},{},{:.2f}\n", r.info.atom_metric, r.atom_value(), r.tokens, r.seconds);
  }
  if (average_tasks > 0) s += fmt::format("average,,,,,,,,atom({} tasks),{:.6f},,\n", average_tasks, average);
  return s;
}

std::string ZeroShotResults::to_table() const {
  std::string s = fmt::format("zero-shot: {} | device {} | protocol {} | window {} | {}\n\n", model, device, protocol,
                              max_length,
                              limit > 0 ? fmt::format("--limit {} (lm-eval 0.3.0's subset: Python "
                                                      "random.Random({}).shuffle, first {})",
                                                      limit, seed, limit)
                                        : std::string("all docs"));
  s += "| task | n | acc | acc_norm | ppl | Atom's metric |\n|---|---|---|---|---|---|\n";
  auto pct = [](double v, double e) { return fmt::format("{:.2f} ± {:.2f}", 100 * v, 100 * e); };
  for (const TaskResult& r : tasks) {
    s += fmt::format("| {} | {}{} | {} | {} | {} | {} |\n", r.info.name, r.n,
                     r.n < r.total ? fmt::format("/{}", r.total) : "", pct(r.acc, r.acc_stderr),
                     r.info.has_acc_norm ? pct(r.acc_norm, r.acc_norm_stderr) : "—",
                     r.info.kind == TaskKind::LastWord ? fmt::format("{:.3f}", r.ppl) : "—",
                     r.info.atom_metric.empty() ? "—" : r.info.atom_metric);
  }
  if (average_tasks > 0)
    s += fmt::format("| **average ({} of 6, Atom's rule)** | | | | | **{:.2f}** |\n", average_tasks, 100 * average);
  s += "\nAccuracies in %, ± one standard error (lm-eval's mean_stderr).\n";
  for (const TaskResult& r : tasks) {
    if (!r.note.empty()) s += fmt::format("Note ({}): {}.\n", r.info.name, r.note);
    if (r.truncated)
      s += fmt::format("Note ({}): {} continuation(s) longer than the {}-token window were scored on their last {} "
                       "tokens (lm-eval stops with an assertion there).\n",
                       r.info.name, r.truncated, max_length, max_length);
  }
  for (const std::string& u : unavailable) s += fmt::format("Not run: {}\n", u);
  return s;
}

}  // namespace nibble
