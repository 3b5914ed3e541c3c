// Zero-shot accuracy as lm-evaluation-harness scores it: every choice of a question is a
// (context, continuation) request, its score is the sum of the continuation tokens' log-probs,
// and the prediction is the best-scoring choice (tasks.h has the strings and the metrics).
//
// Tokenization protocols (a request's strings -> context tokens + continuation tokens):
//  - LLProtocol::Harness04 (default): lm-eval >= 0.4's HFLM._encode_pair: trailing whitespace of
//    the context moves to the front of the continuation; context+continuation is encoded as one
//    string and split where the context's own encoding ends. Both are encoded with the
//    tokenizer's default special tokens (add_special_tokens=True: a BOS for Llama-2/Mistral, none
//    for the original Llama-3 tokenizer.json), which is what the current HFLM does when
//    add_bos_token is left unset (earlier 0.4 releases passed add_special_tokens=False: no BOS).
//  - LLProtocol::Harness03: lm-eval 0.3.0 as Atom ran it (Atom's model/LMClass.py over
//    BaseLM.loglikelihood): context and continuation encoded separately, no special tokens, and
//    concatenated. With a SentencePiece tokenizer the continuation " yes" then starts with a lone
//    "▁" token (the dummy prefix), which is what that version scored.
// Context longer than the model's window: lm-eval's left truncation,
// (context + continuation)[-(max_length + 1):][:-1] is fed and the continuation rows are scored.
// A continuation longer than the window itself (lm-eval stops with an assertion) is scored on its
// last max_length tokens; such choices are counted and reported (TaskResult::truncated).
//
// Scoring runs on an Executor (any backend; the Model overloads use the CPU reference executor):
// the choices of one question share a prefix (the context, or for WinoGrande the sentence before
// the blank); that prefix is forwarded once into a sequence of the executor's KV pool, each choice
// forwards only its own tokens on a fork of it, and several questions go through the model as one
// batch. The first continuation token is scored from the prefix's last logits row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/backend/backend.h"
#include "nibble/eval/tasks.h"
#include "nibble/model/model.h"

namespace nibble {

class Tokenizer;

enum class LLProtocol { Harness04, Harness03 };
const char* protocol_name(LLProtocol p);        // "lm-eval-0.4", "lm-eval-0.3"
LLProtocol parse_protocol(const std::string& s);  // accepts the names above (and "0.4", "0.3", "atom")

// Encodes text; add_bos adds the tokenizer's default special tokens (Tokenizer::encode's add_bos).
using EncodeFn = std::function<std::vector<int32_t>(const std::string& text, bool add_bos)>;

struct TokenizedRequest {
  std::vector<int32_t> context, continuation;
};

// One request's tokens under a protocol; `bos` (the tokenizer's BOS id, -1: none) is the prefix
// token of an empty context.
TokenizedRequest tokenize_request(const LLRequest& r, const EncodeFn& encode, int32_t bos, LLProtocol p);

struct LLResult {
  double logprob = 0;      // sum of the continuation tokens' log-probabilities (float64 log-softmax)
  bool is_greedy = false;  // every continuation token is the argmax of its row
  bool truncated = false;  // the continuation alone exceeded the window: only its last tokens count
};

struct ScoreOptions {
  int64_t max_length = 0;       // model window for truncation; 0 = max_position_embeddings
  int64_t batch_docs = 16;      // questions forwarded together
  int64_t batch_tokens = 2048;  // cap on the tokens of one batch's prefixes, and of its choices
  // Cap on the tokens of one Executor::forward call (a CUDA executor's max_batch_tokens): a batch
  // over it goes in several calls, never splitting a sequence. 0 = one call per batch and phase.
  // A batch's first question is taken whole, so forward_tokens() is what an executor must take.
  int64_t max_forward_tokens = 0;

  int64_t window(const ModelConfig& c) const { return max_length > 0 ? max_length : c.max_position_embeddings; }
  // The most tokens one forward call needs with max_forward_tokens set to it.
  int64_t forward_tokens(const ModelConfig& c) const { return std::max(batch_tokens, window(c)); }
};

// Scores groups of requests (a group = the choices of one question); result[g][i] belongs to
// groups[g][i]. `on_group_done(k)` is called with the number of groups finished so far. The
// sequences it adds to the executor's KV pool are freed before it returns.
std::vector<std::vector<LLResult>> score_loglikelihood(Executor& exec,
                                                       std::span<const std::vector<TokenizedRequest>> groups,
                                                       const ScoreOptions& opt,
                                                       const std::function<void(int64_t)>& on_group_done = {},
                                                       int64_t* tokens_forwarded = nullptr);
std::vector<std::vector<LLResult>> score_loglikelihood(Model& model,
                                                       std::span<const std::vector<TokenizedRequest>> groups,
                                                       const ScoreOptions& opt,
                                                       const std::function<void(int64_t)>& on_group_done = {},
                                                       int64_t* tokens_forwarded = nullptr);

// ---------------------------------------------------------------------------------------------

struct TaskResult {
  TaskInfo info;
  int64_t n = 0, total = 0;  // scored docs, docs in the file
  double acc = 0, acc_stderr = 0;
  double acc_norm = 0, acc_norm_stderr = 0;  // only when info.has_acc_norm
  double ppl = 0;                            // LAMBADA: exp(-mean loglik of the target)
  int64_t tokens = 0;                        // tokens forwarded
  int64_t truncated = 0;                     // choices whose continuation exceeded the window
  double seconds = 0;
  std::string source, note;
  std::vector<int64_t> doc_indices;          // which docs of the file were scored
  std::vector<std::vector<double>> logliks;  // per scored doc, per choice

  // The value Atom's table uses for this task (acc_norm or acc); LAMBADA: acc.
  double atom_value() const;
  double atom_stderr() const;
  nlohmann::json to_json() const;
};

struct ZeroShotOptions {
  std::filesystem::path tasks_dir;  // shared/data/tasks layout
  int64_t limit = 0;                // 0 = every doc; else `limit` docs chosen as lm-eval 0.3.0 does
  uint64_t seed = 42;               // the shuffle seed of that choice (lm-eval 0.3.0 fixes 42)
  LLProtocol protocol = LLProtocol::Harness04;
  ScoreOptions score;
  bool show_progress = true;
};

struct ZeroShotResults {
  std::vector<TaskResult> tasks;
  std::vector<std::string> unavailable;  // "task: reason" for tasks whose data is missing
  // Atom's average (lm-eval 0.3.0, 0-shot): acc_norm for PIQA, ARC-e, ARC-c, HellaSwag, acc for
  // BoolQ and WinoGrande, over the ones that ran; average_tasks says how many of the six.
  double average = 0;
  int average_tasks = 0;
  std::string model, device, protocol;  // model: set by the caller of the Executor overloads
  int64_t limit = 0, max_length = 0;
  uint64_t seed = 42;

  nlohmann::json to_json() const;
  std::string to_csv() const;
  std::string to_table() const;  // Markdown table + notes
};

// The library entry point (`nibble eval`, `nibble ablate --tasks`): loads each task's data,
// scores it on `exec` and aggregates. Tasks without data are listed in `unavailable`.
ZeroShotResults evaluate_tasks(Executor& exec, const Tokenizer& tokenizer, std::span<const std::string> tasks,
                               const ZeroShotOptions& opt);
ZeroShotResults evaluate_tasks(Executor& exec, const EncodeFn& encode, int32_t bos,
                               std::span<const std::string> tasks, const ZeroShotOptions& opt);
// On the CPU reference executor of `model` (results name model.source()).
ZeroShotResults evaluate_tasks(Model& model, const Tokenizer& tokenizer, std::span<const std::string> tasks,
                               const ZeroShotOptions& opt);
// Scores already-loaded tasks (tests, and callers that reuse one load across models).
TaskResult evaluate_task(Executor& exec, const EncodeFn& encode, int32_t bos, const Task& task,
                         const ZeroShotOptions& opt);
TaskResult evaluate_task(Model& model, const EncodeFn& encode, int32_t bos, const Task& task,
                         const ZeroShotOptions& opt);

// Which docs of n a run scores (sorted): all, or the first `limit` of Python's
// random.Random(seed).shuffle(range(n)), which is lm-eval 0.3.0's --limit with seed 42.
std::vector<int64_t> select_docs(int64_t n, int64_t limit, uint64_t seed = 42);
// Python's random.Random(seed).shuffle(list(range(n))), bit for bit.
std::vector<int64_t> python_shuffled(int64_t n, uint64_t seed);
// lm-eval's mean_stderr: sample standard deviation / sqrt(n).
double mean_stderr(std::span<const double> xs);
// The default tasks folder: $NIBBLE_DATA/tasks, else shared/data/tasks in the nearest folder
// above the running binary, else above the working folder.
std::filesystem::path default_tasks_dir();

}  // namespace nibble
