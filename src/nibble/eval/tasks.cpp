#include "nibble/eval/tasks.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "nibble/core/error.h"
#include "nibble/core/json.h"
#include "nibble/io/text_file.h"

#if __has_include(<bzlib.h>)
#include <bzlib.h>
#define NIBBLE_HAVE_BZLIB_H 1
#endif

namespace nibble {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ----------------------------------------------------------------------------------------------
// The task table.

const std::vector<TaskInfo>& known_tasks() {
  static const std::vector<TaskInfo> tasks = {
      {"piqa", TaskKind::MultipleChoice, true, "acc_norm", "validation"},
      {"arc_easy", TaskKind::MultipleChoice, true, "acc_norm", "test"},
      {"arc_challenge", TaskKind::MultipleChoice, true, "acc_norm", "test"},
      {"boolq", TaskKind::MultipleChoice, false, "acc", "validation"},
      {"hellaswag", TaskKind::MultipleChoice, true, "acc_norm", "validation"},
      {"winogrande", TaskKind::MultipleChoice, false, "acc", "validation"},
      {"lambada_openai", TaskKind::LastWord, false, "", "test"},
  };
  return tasks;
}

const TaskInfo& task_info(std::string_view name) {
  for (const TaskInfo& t : known_tasks())
    if (t.name == name) return t;
  std::string names;
  for (const TaskInfo& t : known_tasks()) names += (names.empty() ? "" : ", ") + t.name;
  throw Error("--tasks", fmt::format("unknown task '{}' (known: {})", name, names));
}

std::vector<std::string> atom_task_names() {
  std::vector<std::string> out;
  for (const TaskInfo& t : known_tasks())
    if (!t.atom_metric.empty()) out.push_back(t.name);
  return out;
}

std::vector<std::string> task_files(std::string_view name) {
  const std::string n(name);
  if (n == "piqa") return {"piqa/valid.jsonl"};  // + piqa/valid-labels.lst
  if (n == "arc_easy") return {"arc_easy/ARC-Easy-test.jsonl"};
  if (n == "arc_challenge") return {"arc_challenge/ARC-Challenge-test.jsonl"};
  if (n == "boolq") return {"boolq/val.jsonl"};
  if (n == "hellaswag") return {"hellaswag/hellaswag_val_full.txt", "hellaswag/hellaswag_val_full.txt.bz2"};
  if (n == "winogrande") return {"winogrande/dev.jsonl"};
  if (n == "lambada_openai") return {"lambada_openai/lambada_test.jsonl"};
  task_info(name);  // throws
  return {};
}

bool task_available(std::string_view name, const fs::path& tasks_dir) {
  for (const std::string& f : task_files(name))
    if (fs::exists(tasks_dir / f)) {
      if (name == "piqa") return fs::exists(tasks_dir / "piqa/valid-labels.lst");
      return true;
    }
  return false;
}

// ----------------------------------------------------------------------------------------------
// Python string semantics.

namespace {

// Decodes one UTF-8 code point at s[i] (the text was validated; a bad byte counts as itself).
char32_t decode_at(std::string_view s, size_t i, size_t* len) {
  const auto c = static_cast<unsigned char>(s[i]);
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (i + size_t(n) > s.size()) n = 1;
  char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + size_t(k)]) & 0x3f);
  *len = size_t(n);
  return cp;
}

// Python's str.isspace() for one code point.
bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  // Python's str.replace: non-overlapping, left to right, no rescan of the replacement.
  std::string out;
  size_t i = 0;
  while (true) {
    const size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    out.append(to);
    i = j + from.size();
  }
  out.append(s, i, std::string::npos);
  s = std::move(out);
}

}  // namespace

namespace {

std::string strip_impl(std::string_view s, bool left) {
  size_t b = 0, e = s.size();
  while (left && b < e) {
    size_t n;
    if (!py_isspace(decode_at(s, b, &n))) break;
    b += n;
  }
  while (e > b) {  // backwards, one code point at a time
    size_t start = e - 1;
    while (start > b && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
    size_t n;
    if (!py_isspace(decode_at(s, start, &n)) || start + n != e) break;
    e = start;
  }
  return std::string(s.substr(b, e - b));
}

}  // namespace

std::string py_strip(std::string_view s) { return strip_impl(s, true); }
std::string py_rstrip(std::string_view s) { return strip_impl(s, false); }

int64_t utf8_length(std::string_view s) {
  int64_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xc0) != 0x80;
  return n;
}

std::string hellaswag_preprocess(std::string_view text) {
  std::string t = py_strip(text);
  replace_all(t, " [title]", ". ");
  // re.sub("\\[.*?\\]", "", t): '.' does not match '\n', so a bracket closed only after a
  // newline is not a match and the scan moves on to the next '['.
  std::string out;
  out.reserve(t.size());
  for (size_t i = 0; i < t.size();) {
    if (t[i] == '[') {
      size_t j = i + 1;
      while (j < t.size() && t[j] != ']' && t[j] != '\n') ++j;
      if (j < t.size() && t[j] == ']') {
        i = j + 1;
        continue;
      }
    }
    out.push_back(t[i++]);
  }
  replace_all(out, "  ", " ");
  return out;
}

// ----------------------------------------------------------------------------------------------
// Request builders (lm-eval 0.3.0 task classes; see tasks.h).

namespace {

TaskDoc multiple_choice(const std::string& context, const std::vector<std::string>& choices, int gold,
                        bool norm) {
  TaskDoc d;
  d.gold = gold;
  for (const std::string& c : choices) {
    d.choices.push_back({context, " " + c});  // MultipleChoiceTask: rf.loglikelihood(ctx, " {}".format(choice))
    if (norm) d.norm_lengths.push_back(double(utf8_length(c)));
  }
  return d;
}

}  // namespace

TaskDoc piqa_doc(const std::string& goal, const std::string& sol1, const std::string& sol2, int label) {
  check(label == 0 || label == 1, "piqa", "label must be 0 or 1, got {}", label);
  return multiple_choice("Question: " + goal + "\nAnswer:", {sol1, sol2}, label, true);
}

TaskDoc arc_doc(const std::string& question, const std::vector<std::string>& choice_texts,
                const std::vector<std::string>& choice_labels, const std::string& answer_key,
                const std::string& where) {
  check(!choice_texts.empty() && choice_texts.size() == choice_labels.size(), where,
        "choices.text has {} entries and choices.label {}", choice_texts.size(), choice_labels.size());
  // 0.4: doc_to_target = choices.label.index(answerKey). 0.3.0 maps "1".."5" to "A".."E" and takes
  // the letter's position; the two agree on every ARC item because the labels are in order.
  const auto it = std::find(choice_labels.begin(), choice_labels.end(), answer_key);
  check(it != choice_labels.end(), where, "answerKey '{}' is not one of the choice labels", answer_key);
  return multiple_choice("Question: " + question + "\nAnswer:", choice_texts, int(it - choice_labels.begin()), true);
}

TaskDoc boolq_doc(const std::string& passage, const std::string& question, bool label) {
  // 0.3.0 scores " yes" and " no" and predicts yes iff ll_yes > ll_no; choices ["no", "yes"] with
  // a first-maximum argmax is the same rule (a tie answers "no").
  return multiple_choice(passage + "\nQuestion: " + question + "?\nAnswer:", {"no", "yes"}, label ? 1 : 0, false);
}

TaskDoc hellaswag_doc(const std::string& ctx_line, const std::vector<std::string>& endings, int label) {
  check(endings.size() == 4, "hellaswag", "expected 4 endings, got {}", endings.size());
  check(label >= 0 && label < 4, "hellaswag", "label must be 0..3, got {}", label);
  std::vector<std::string> choices;
  for (const std::string& e : endings) choices.push_back(hellaswag_preprocess(e));
  return multiple_choice(hellaswag_preprocess(ctx_line), choices, label, true);
}

TaskDoc winogrande_doc(const std::string& sentence, const std::string& option1, const std::string& option2,
                       const std::string& answer, const std::string& where) {
  const size_t blank = sentence.find('_');
  check(blank != std::string::npos, where, "the sentence has no '_' blank");
  check(answer == "1" || answer == "2", where, "answer must be \"1\" or \"2\", got \"{}\"", answer);
  // Partial evaluation: the option replaces the blank, everything after the blank is the target
  // that is scored, and the contexts differ per option.
  const std::string target = " " + py_strip(std::string_view(sentence).substr(blank + 1));
  TaskDoc d;
  d.gold = answer == "1" ? 0 : 1;
  for (const std::string* opt : {&option1, &option2}) d.choices.push_back({sentence.substr(0, blank) + *opt, target});
  return d;
}

TaskDoc lambada_doc(const std::string& text, const std::string& where) {
  const size_t sp = text.rfind(' ');  // text.rsplit(" ", 1)
  check(sp != std::string::npos, where, "the text has no space to split the last word at");
  TaskDoc d;
  d.choices.push_back({text.substr(0, sp), " " + text.substr(sp + 1)});
  d.gold = 0;
  return d;
}

// ----------------------------------------------------------------------------------------------
// JSON Lines parsers.

namespace {


std::string get_string(const json& j, const char* key, const std::string& where) {
  check(j.is_object() && j.contains(key) && j[key].is_string(), where, "missing string field \"{}\"", key);
  return j[key].get<std::string>();
}

std::vector<std::string> get_strings(const json& j, const std::string& where, const char* what) {
  check(j.is_array(), where, "\"{}\" is not an array", what);
  std::vector<std::string> out;
  for (const json& x : j) {
    check(x.is_string(), where, "\"{}\" holds a non-string", what);
    out.push_back(x.get<std::string>());
  }
  return out;
}

}  // namespace

TaskDoc piqa_doc_from_json(std::string_view line, int label, const std::string& where) {
  const json j = parse_json(line, where);
  return piqa_doc(get_string(j, "goal", where), get_string(j, "sol1", where), get_string(j, "sol2", where), label);
}

TaskDoc arc_doc_from_json(std::string_view line, const std::string& where) {
  const json j = parse_json(line, where);
  check(j.contains("choices") && j["choices"].is_object(), where, "missing object field \"choices\"");
  const json& c = j["choices"];
  check(c.contains("text") && c.contains("label"), where, "\"choices\" needs \"text\" and \"label\"");
  return arc_doc(get_string(j, "question", where), get_strings(c["text"], where, "choices.text"),
                 get_strings(c["label"], where, "choices.label"), get_string(j, "answerKey", where), where);
}

TaskDoc boolq_doc_from_json(std::string_view line, const std::string& where) {
  const json j = parse_json(line, where);
  check(j.contains("label"), where, "missing field \"label\"");
  const json& l = j["label"];
  bool label;
  if (l.is_boolean()) label = l.get<bool>();
  else if (l.is_number_integer() && (l.get<int>() == 0 || l.get<int>() == 1)) label = l.get<int>() == 1;
  else throw Error(where, "\"label\" must be true/false or 0/1");
  return boolq_doc(get_string(j, "passage", where), get_string(j, "question", where), label);
}

TaskDoc winogrande_doc_from_json(std::string_view line, const std::string& where) {
  const json j = parse_json(line, where);
  return winogrande_doc(get_string(j, "sentence", where), get_string(j, "option1", where),
                        get_string(j, "option2", where), get_string(j, "answer", where), where);
}

TaskDoc lambada_doc_from_json(std::string_view line, const std::string& where) {
  const json j = parse_json(line, where);
  return lambada_doc(get_string(j, "text", where), where);
}

namespace {

// Splits on '\n'; a final line without '\n' counts, a final empty one does not.
std::vector<std::string_view> split_lines(std::string_view text) {
  std::vector<std::string_view> lines;
  size_t i = 0;
  while (i < text.size()) {
    size_t j = text.find('\n', i);
    if (j == std::string_view::npos) j = text.size();
    std::string_view l = text.substr(i, j - i);
    if (!l.empty() && l.back() == '\r') l.remove_suffix(1);
    lines.push_back(l);
    i = j + 1;
  }
  return lines;
}

}  // namespace

std::vector<TaskDoc> hellaswag_docs_from_text(std::string_view text, const std::string& where) {
  const std::vector<std::string_view> lines = split_lines(text);
  check(lines.size() % 6 == 0, where, "{} lines is not a multiple of 6 (context, label, 4 endings per item)",
        lines.size());
  std::vector<TaskDoc> docs;
  for (size_t i = 0; i < lines.size(); i += 6) {
    const std::string w = fmt::format("{}:{}", where, i + 2);
    const std::string_view lab = lines[i + 1];
    check(lab.size() == 1 && lab[0] >= '0' && lab[0] <= '3', w, "the gold label must be 0..3, got \"{}\"", lab);
    std::vector<std::string> endings;
    for (size_t k = 0; k < 4; ++k) endings.emplace_back(lines[i + 2 + k]);
    docs.push_back(hellaswag_doc(std::string(lines[i]), endings, lab[0] - '0'));
  }
  return docs;
}

// ----------------------------------------------------------------------------------------------
// Files.

namespace {

#ifdef NIBBLE_HAVE_BZLIB_H
// libbz2 is opened at run time: the build links no extra library for one data file.
std::string bunzip2(const std::string& data, const std::string& where) {
  void* lib = dlopen("libbz2.so.1.0", RTLD_NOW | RTLD_LOCAL);
  if (!lib) lib = dlopen("libbz2.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) lib = dlopen("libbz2.so", RTLD_NOW | RTLD_LOCAL);
  check(lib != nullptr, where, "libbz2 could not be loaded (install libbz2-1.0, or decompress the file with bunzip2)");
  using InitFn = int (*)(bz_stream*, int, int);
  using RunFn = int (*)(bz_stream*);
  auto init = reinterpret_cast<InitFn>(dlsym(lib, "BZ2_bzDecompressInit"));
  auto run = reinterpret_cast<RunFn>(dlsym(lib, "BZ2_bzDecompress"));
  auto end = reinterpret_cast<RunFn>(dlsym(lib, "BZ2_bzDecompressEnd"));
  check(init && run && end, where, "libbz2 lacks the BZ2_bzDecompress functions");
  std::string out;
  size_t pos = 0;
  // A .bz2 file may hold several concatenated streams; decode them all.
  while (pos < data.size()) {
    bz_stream s;
    std::memset(&s, 0, sizeof(s));
    check(init(&s, 0, 0) == BZ_OK, where, "BZ2_bzDecompressInit failed");
    s.next_in = const_cast<char*>(data.data() + pos);
    s.avail_in = unsigned(std::min<size_t>(data.size() - pos, 1u << 30));
    int rc = BZ_OK;
    char buf[1 << 16];
    while (rc == BZ_OK) {
      s.next_out = buf;
      s.avail_out = sizeof(buf);
      rc = run(&s);
      out.append(buf, sizeof(buf) - s.avail_out);
      if (rc == BZ_OK && s.avail_in == 0 && s.avail_out != 0) rc = BZ_UNEXPECTED_EOF;
    }
    const size_t consumed = size_t(s.next_in - data.data()) - pos;
    end(&s);
    check(rc == BZ_STREAM_END, where, "corrupt or truncated bzip2 data (libbz2 code {}) at byte {}", rc, pos + consumed);
    pos += consumed;
  }
  return out;
}
#endif

}  // namespace

std::string read_maybe_bz2(const fs::path& path) {
  const std::string where = path.string();
  if (path.extension() != ".bz2") return read_text_file(path);
#ifdef NIBBLE_HAVE_BZLIB_H
  std::ifstream f(path, std::ios::binary);
  check(bool(f), where, "cannot open the file");
  const std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::string text = bunzip2(data, where);
  const size_t bad = find_invalid_utf8(text);
  check(bad == std::string::npos, where, "decompressed text is not UTF-8 at byte {}", bad);
  return text;
#else
  throw Error(where, "this build has no bzip2 support: decompress the file with bunzip2 and pass the .txt");
#endif
}

Task load_task(std::string_view name, const fs::path& tasks_dir) {
  Task t;
  t.info = task_info(name);
  fs::path file;
  for (const std::string& f : task_files(name))
    if (fs::exists(tasks_dir / f)) {
      file = tasks_dir / f;
      break;
    }
  check(!file.empty(), tasks_dir.string(), "no data for task '{}' (looked for {})", name,
        fmt::join(task_files(name), " or "));
  t.source = file.string();
  const std::string text = read_maybe_bz2(file);
  const std::string fname = file.filename().string();

  if (name == "hellaswag") {
    t.docs = hellaswag_docs_from_text(text, fname);
    t.note = "HellaSwag read from llama.cpp's preprocessed text (ctx_b not capitalized as lm-eval does); "
             "scores are close to, not identical with, lm-eval's";
    return t;
  }
  const std::vector<std::string_view> lines = split_lines(text);
  std::vector<std::string_view> labels;
  std::string labels_text;
  if (name == "piqa") {
    const fs::path lf = tasks_dir / "piqa/valid-labels.lst";
    labels_text = read_text_file(lf);
    labels = split_lines(labels_text);
    check(labels.size() == lines.size(), lf.string(), "{} labels for {} questions in {}", labels.size(),
          lines.size(), fname);
    t.source += " + " + lf.string();
  }
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string where = fmt::format("{}:{}", fname, i + 1);
    if (name == "piqa") {
      const std::string_view l = labels[i];
      check(l == "0" || l == "1", fmt::format("valid-labels.lst:{}", i + 1), "label must be 0 or 1, got \"{}\"", l);
      t.docs.push_back(piqa_doc_from_json(lines[i], l[0] - '0', where));
    } else if (name == "arc_easy" || name == "arc_challenge") {
      t.docs.push_back(arc_doc_from_json(lines[i], where));
    } else if (name == "boolq") {
      t.docs.push_back(boolq_doc_from_json(lines[i], where));
    } else if (name == "winogrande") {
      t.docs.push_back(winogrande_doc_from_json(lines[i], where));
    } else if (name == "lambada_openai") {
      t.docs.push_back(lambada_doc_from_json(lines[i], where));
    }
  }
  return t;
}

}  // namespace nibble
