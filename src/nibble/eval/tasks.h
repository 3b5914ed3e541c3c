// Zero-shot tasks: the data files of the common-sense benchmarks Atom reports, turned into the
// (context, continuation) requests lm-evaluation-harness builds for them.
//
// Version followed: lm-evaluation-harness 0.3.0 (the Python task classes Atom ran: lm_eval/tasks/
// {piqa,arc,superglue,hellaswag,winogrande,lambada}.py, MultipleChoiceTask in lm_eval/base.py).
// For these tasks the 0.4 YAML configs (lm_eval/tasks/{piqa,arc,boolq,hellaswag,winogrande,
// lambada}/...) build the same strings: the same doc_to_text, the same choices, the target
// delimiter " " in front of every continuation, and the same gold index. Where they differ it is
// only in how a string pair is tokenized, which is zero_shot.h's business, not this file's.
//
// Per task (context | continuation per choice | gold):
//   piqa           "Question: {goal}\nAnswer:"                 | " {sol1}", " {sol2}"        | label
//   arc_easy/-chal "Question: {question}\nAnswer:"             | " {choices.text[i]}"        | choices.label.index(answerKey)
//   boolq          "{passage}\nQuestion: {question}?\nAnswer:" | " no", " yes"               | label (1 = yes)
//   hellaswag      preprocess(activity_label + ": " + ctx)     | " " + preprocess(ending_i)  | label
//   winogrande     sentence[:i] + option_k  (i = index of "_") | " " + sentence[i+1:].strip()| answer - 1
//   lambada_openai text.rsplit(" ", 1)[0]                      | " " + last word             | (greedy match)
// Metrics: acc = argmax of the summed log-likelihoods (first maximum wins, as numpy's argmax);
// acc_norm (PIQA, ARC, HellaSwag) = argmax of loglik / len(choice), where len is Python's len of
// the choice text WITHOUT the delimiter space, i.e. its Unicode code points (MultipleChoiceTask.
// process_results: `completion_len = np.array([float(len(i)) for i in doc["choices"]])`).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace nibble {

// One (context, continuation) pair: lm-eval's `rf.loglikelihood(context, continuation)`.
struct LLRequest {
  std::string context, continuation;
};

// One item of a task: its choices (one request each) and the correct one.
struct TaskDoc {
  std::vector<LLRequest> choices;
  int gold = 0;                        // index into choices; LAMBADA has one choice and gold 0
  std::vector<double> norm_lengths;    // acc_norm divisors (one per choice), empty if no acc_norm
};

enum class TaskKind {
  MultipleChoice,  // acc (+ acc_norm where the task reports it)
  LastWord,        // LAMBADA: acc = greedy continuation equals the target, ppl = exp(-mean loglik)
};

struct TaskInfo {
  std::string name;         // lm-eval's task name: "piqa", "arc_easy", ...
  TaskKind kind = TaskKind::MultipleChoice;
  bool has_acc_norm = false;
  std::string atom_metric;  // the metric Atom's average uses ("acc_norm" or "acc"); "" = not averaged
  std::string split;        // the split lm-eval scores ("validation", "test")
};

struct Task {
  TaskInfo info;
  std::vector<TaskDoc> docs;
  std::string source;       // the file(s) the docs were read from
  std::string note;         // a caveat printed with the results ("" if the data is lm-eval's own)
};

// The tasks nibble knows, in the order of Atom's table, then LAMBADA.
const std::vector<TaskInfo>& known_tasks();
const TaskInfo& task_info(std::string_view name);  // throws nibble::Error for an unknown name
// The six tasks of Atom's zero-shot table (the default task list).
std::vector<std::string> atom_task_names();

// Loads a task from `tasks_dir` (shared/data/tasks layout: piqa/valid.jsonl + valid-labels.lst,
// arc_easy/ARC-Easy-test.jsonl, arc_challenge/ARC-Challenge-test.jsonl, boolq/val.jsonl,
// hellaswag/hellaswag_val_full.txt[.bz2], winogrande/dev.jsonl, lambada_openai/lambada_test.jsonl).
// Errors name the file and line.
Task load_task(std::string_view name, const std::filesystem::path& tasks_dir);
// The data files `load_task` reads for a task, relative to tasks_dir (the first existing one is used).
std::vector<std::string> task_files(std::string_view name);
// Whether the data for a task is present under tasks_dir.
bool task_available(std::string_view name, const std::filesystem::path& tasks_dir);

// --- Request builders: one record of a task's data file -> one doc, exactly as lm-eval builds it.
// `where` names the record for error messages ("valid.jsonl:12").
TaskDoc piqa_doc(const std::string& goal, const std::string& sol1, const std::string& sol2, int label);
TaskDoc arc_doc(const std::string& question, const std::vector<std::string>& choice_texts,
                const std::vector<std::string>& choice_labels, const std::string& answer_key, const std::string& where);
TaskDoc boolq_doc(const std::string& passage, const std::string& question, bool label);
TaskDoc hellaswag_doc(const std::string& ctx_line, const std::vector<std::string>& endings, int label);
TaskDoc winogrande_doc(const std::string& sentence, const std::string& option1, const std::string& option2,
                       const std::string& answer, const std::string& where);
TaskDoc lambada_doc(const std::string& text, const std::string& where);

// Parsers of one line of each data file (JSON Lines), for tests and the loaders.
TaskDoc piqa_doc_from_json(std::string_view line, int label, const std::string& where);
TaskDoc arc_doc_from_json(std::string_view line, const std::string& where);
TaskDoc boolq_doc_from_json(std::string_view line, const std::string& where);
TaskDoc winogrande_doc_from_json(std::string_view line, const std::string& where);
TaskDoc lambada_doc_from_json(std::string_view line, const std::string& where);
// llama.cpp's HellaSwag text: 6 lines per item (context, gold label, 4 endings).
std::vector<TaskDoc> hellaswag_docs_from_text(std::string_view text, const std::string& where);

// --- Python string semantics the builders need.
// HellaSwag.preprocess: strip(); " [title]" -> ". "; re.sub("\\[.*?\\]", ""); "  " -> " ".
std::string hellaswag_preprocess(std::string_view text);
// str.strip() / str.rstrip() with no argument (Python's Unicode whitespace).
std::string py_strip(std::string_view s);
std::string py_rstrip(std::string_view s);
// len(str): Unicode code points of UTF-8 text.
int64_t utf8_length(std::string_view s);

// Reads a .bz2 file (libbz2, loaded at run time) or a plain file.
std::string read_maybe_bz2(const std::filesystem::path& path);

}  // namespace nibble
