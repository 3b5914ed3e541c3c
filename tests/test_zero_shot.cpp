// Zero-shot tasks: the requests lm-evaluation-harness builds (hand-checked strings), the task
// files in ../shared/data/tasks, and the log-likelihood scorer against float64 references.
#include <algorithm>
#include <cmath>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/eval/tasks.h"
#include "nibble/eval/zero_shot.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

void expect_request(const TaskDoc& d, size_t i, const std::string& context, const std::string& continuation) {
  ASSERT_LT(i, d.choices.size());
  EXPECT_EQ(d.choices[i].context, context) << "choice " << i;
  EXPECT_EQ(d.choices[i].continuation, continuation) << "choice " << i;
}

// ---------------------------------------------------------------------------------------------
// Requests, written out as lm-eval 0.3.0 (and the 0.4 YAML configs) produce them.

TEST(ZeroShotRequests, Piqa) {
  // piqa/valid.jsonl line 2 (trailing and double spaces are kept: lm-eval does not strip them).
  const TaskDoc d = piqa_doc_from_json(
      R"({"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin "})", 1,
      "piqa");
  ASSERT_EQ(d.choices.size(), 2u);
  expect_request(d, 0, "Question: dresser\nAnswer:", " replace drawer with bobby pin ");
  expect_request(d, 1, "Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ");
  EXPECT_EQ(d.gold, 1);
  // acc_norm divides by len(choice), the choice without the delimiter space.
  EXPECT_EQ(d.norm_lengths, (std::vector<double>{30, 34}));
}

TEST(ZeroShotRequests, ArcLetterNumericThreeAndFiveChoices) {
  const TaskDoc a = arc_doc_from_json(
      R"({"id":"NYSEDREGENTS_2015_8_28","question":"All living and nonliving material is composed of","choices":{"text":["air","elements","water","soil"],"label":["1","2","3","4"]},"answerKey":"2"})",
      "arc");
  ASSERT_EQ(a.choices.size(), 4u);
  expect_request(a, 0, "Question: All living and nonliving material is composed of\nAnswer:", " air");
  expect_request(a, 1, "Question: All living and nonliving material is composed of\nAnswer:", " elements");
  EXPECT_EQ(a.gold, 1);  // "2" -> "B" -> 1
  EXPECT_EQ(a.norm_lengths, (std::vector<double>{3, 8, 5, 4}));

  const TaskDoc b = arc_doc_from_json(
      R"({"id":"NYSEDREGENTS_2008_4_6","question":"When a rock is placed in a graduated cylinder containing water, the height of the water will","choices":{"text":["decrease","increase","remain the same"],"label":["A","B","C"]},"answerKey":"B"})",
      "arc");
  ASSERT_EQ(b.choices.size(), 3u);
  expect_request(b, 2,
                 "Question: When a rock is placed in a graduated cylinder containing water, the height of the water "
                 "will\nAnswer:",
                 " remain the same");
  EXPECT_EQ(b.gold, 1);

  const TaskDoc c = arc_doc_from_json(
      R"({"id":"x","question":"Q?","choices":{"text":["a","b","c","d","e é"],"label":["A","B","C","D","E"]},"answerKey":"E"})",
      "arc");
  ASSERT_EQ(c.choices.size(), 5u);
  EXPECT_EQ(c.gold, 4);
  expect_request(c, 4, "Question: Q?\nAnswer:", " e é");
  EXPECT_EQ(c.norm_lengths[4], 3);  // code points, not bytes (Python's len)

  EXPECT_THROW(arc_doc_from_json(R"({"question":"Q","choices":{"text":["a"],"label":["A"]},"answerKey":"B"})", "arc"),
               Error);
}

TEST(ZeroShotRequests, BoolQ) {
  const TaskDoc d = boolq_doc_from_json(
      R"({"question": "is france the same timezone as the uk", "passage": "Time in France -- Metropolitan France uses Central European Time.", "idx": 7, "label": false})",
      "boolq");
  ASSERT_EQ(d.choices.size(), 2u);
  const std::string ctx =
      "Time in France -- Metropolitan France uses Central European Time.\nQuestion: is france the same timezone as "
      "the uk?\nAnswer:";
  expect_request(d, 0, ctx, " no");
  expect_request(d, 1, ctx, " yes");
  EXPECT_EQ(d.gold, 0);
  EXPECT_TRUE(d.norm_lengths.empty());  // BoolQ reports acc only
  EXPECT_EQ(boolq_doc_from_json(R"({"question":"q","passage":"p","label":true})", "boolq").gold, 1);
  EXPECT_EQ(boolq_doc_from_json(R"({"question":"q","passage":"p","label":1})", "boolq").gold, 1);
}

TEST(ZeroShotRequests, HellaSwagPreprocess) {
  // HellaSwag.preprocess on raw WikiHow-style text (as lm-eval sees it in the HF dataset).
  EXPECT_EQ(hellaswag_preprocess(" Home and Garden: [header] How to clean a roof [title] Rinse the roof. [step] Use a hose. "),
            "Home and Garden: How to clean a roof. Rinse the roof. Use a hose.");
  // Every [...] span goes, non-greedily; "  " -> " " is one left-to-right pass (3 spaces -> 2).
  EXPECT_EQ(hellaswag_preprocess("a [x] b [y]c"), "a b c");
  EXPECT_EQ(hellaswag_preprocess("a   b"), "a  b");
  // '.' in the regex does not cross a newline.
  EXPECT_EQ(hellaswag_preprocess("a [b\nc] d"), "a [b\nc] d");
  EXPECT_EQ(hellaswag_preprocess("say \" hello, [insert name]. \""), "say \" hello, . \"");

  // The first item of llama.cpp's hellaswag_val_full.txt: the context keeps ctx_b's lower case
  // ("he"), where lm-eval has "He" (ctx_b.capitalize()): the documented difference.
  const TaskDoc d = hellaswag_doc("Roof shingle removal: A man is sitting on a roof. he",
                                  {"is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."},
                                  3);
  ASSERT_EQ(d.choices.size(), 4u);
  expect_request(d, 0, "Roof shingle removal: A man is sitting on a roof. he", " is using wrap to wrap a pair of skis.");
  expect_request(d, 3, "Roof shingle removal: A man is sitting on a roof. he", " starts pulling up roofing on a roof.");
  EXPECT_EQ(d.gold, 3);
  EXPECT_EQ(d.norm_lengths, (std::vector<double>{37, 27, 26, 36}));

  const auto docs = hellaswag_docs_from_text("ctx one\n2\ne0\ne1 [x]\ne2\n e3 \nctx two\n0\na\nb\nc\nd\n", "t");
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0].gold, 2);
  expect_request(docs[0], 1, "ctx one", " e1 ");  // strip() comes before the [...] removal
  expect_request(docs[0], 3, "ctx one", " e3");
  EXPECT_THROW(hellaswag_docs_from_text("a\n7\nb\nc\nd\ne\n", "t"), Error);
  EXPECT_THROW(hellaswag_docs_from_text("a\n1\nb\n", "t"), Error);
}

TEST(ZeroShotRequests, WinoGrandePartialEvaluation) {
  const TaskDoc d = winogrande_doc_from_json(
      R"({"qID": "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2", "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"})",
      "wino");
  ASSERT_EQ(d.choices.size(), 2u);
  // The option fills the blank in the context; the text after the blank is the scored target.
  expect_request(d, 0, "Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.");
  expect_request(d, 1, "Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.");
  EXPECT_EQ(d.gold, 1);
  EXPECT_TRUE(d.norm_lengths.empty());
  // The target is stripped of surrounding whitespace, then gets the one delimiter space.
  const TaskDoc e = winogrande_doc("The _  fell. ", "cup", "plate", "1", "w");
  expect_request(e, 1, "The plate", " fell.");
  EXPECT_THROW(winogrande_doc("no blank", "a", "b", "1", "w"), Error);
  EXPECT_THROW(winogrande_doc("a _", "a", "b", "3", "w"), Error);
}

TEST(ZeroShotRequests, Lambada) {
  const TaskDoc d = lambada_doc_from_json(
      R"({"text": "In my palm is a clear stone.\n\n\"Figured if you're going to be out at night.\"\n\nI look at him. But as I stare at Harlin, his mouth curved in a confident grin, I don't care about signs"})",
      "lambada");
  ASSERT_EQ(d.choices.size(), 1u);
  expect_request(d, 0,
                 "In my palm is a clear stone.\n\n\"Figured if you're going to be out at night.\"\n\nI look at him. But "
                 "as I stare at Harlin, his mouth curved in a confident grin, I don't care about",
                 " signs");
  // rsplit(" ", 1) splits at the last space only: a newline is not a separator.
  expect_request(lambada_doc("a b\nc", "l"), 0, "a", " b\nc");
  EXPECT_THROW(lambada_doc("nospace", "l"), Error);
}

TEST(ZeroShotRequests, PythonStringHelpers) {
  EXPECT_EQ(py_strip(" \t\n x y \xc2\xa0\xe3\x80\x80"), "x y");  // NBSP and ideographic space are whitespace
  EXPECT_EQ(py_rstrip("  x \n"), "  x");
  EXPECT_EQ(py_strip("\xc3\xa9"), "\xc3\xa9");
  EXPECT_EQ(utf8_length("h\xc3\xa9llo \xf0\x9f\x98\x80"), 7);
}

TEST(ZeroShotRequests, TaskTable) {
  EXPECT_EQ(atom_task_names(),
            (std::vector<std::string>{"piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande"}));
  EXPECT_EQ(task_info("piqa").atom_metric, "acc_norm");
  EXPECT_EQ(task_info("boolq").atom_metric, "acc");
  EXPECT_EQ(task_info("winogrande").atom_metric, "acc");
  EXPECT_FALSE(task_info("winogrande").has_acc_norm);
  EXPECT_TRUE(task_info("hellaswag").has_acc_norm);
  EXPECT_EQ(task_info("lambada_openai").kind, TaskKind::LastWord);
  EXPECT_THROW(task_info("mmlu"), Error);
  // A folder without data: the loader says so, naming what it looked for.
  EXPECT_FALSE(task_available("piqa", "/nonexistent"));
  EXPECT_THROW(load_task("piqa", "/nonexistent"), Error);
}

// ---------------------------------------------------------------------------------------------
// Tokenization protocols, with a byte-level stand-in encoder (id = byte + 3, BOS = 1).

std::vector<int32_t> byte_encode(const std::string& s, bool bos) {
  std::vector<int32_t> ids;
  if (bos) ids.push_back(1);
  for (unsigned char c : s) ids.push_back(int32_t(c) + 3);
  return ids;
}

TEST(ZeroShotTokenize, Harness04MovesTrailingSpacesAndAddsBos) {
  const TokenizedRequest t = tokenize_request({"Answer: ", "yes"}, byte_encode, 1, LLProtocol::Harness04);
  EXPECT_EQ(t.context, byte_encode("Answer:", true));
  EXPECT_EQ(t.continuation, byte_encode(" yes", false));
  const TokenizedRequest u = tokenize_request({"Q\nAnswer:", " no"}, byte_encode, 1, LLProtocol::Harness04);
  EXPECT_EQ(u.context, byte_encode("Q\nAnswer:", true));
  EXPECT_EQ(u.continuation, byte_encode(" no", false));
  // An empty context scores the continuation after the prefix token.
  const TokenizedRequest e = tokenize_request({"", "hi"}, byte_encode, 1, LLProtocol::Harness04);
  EXPECT_EQ(e.context, (std::vector<int32_t>{1}));
}

TEST(ZeroShotTokenize, Harness03EncodesSeparatelyWithoutBos) {
  // A SentencePiece-like encoder that adds the dummy prefix "▁" (id 2) to every string it encodes.
  auto sp = [](const std::string& s, bool bos) {
    std::vector<int32_t> ids = byte_encode(s, bos);
    ids.insert(ids.begin() + (bos ? 1 : 0), 2);
    return ids;
  };
  const TokenizedRequest t = tokenize_request({"Answer:", " yes"}, sp, 1, LLProtocol::Harness03);
  EXPECT_EQ(t.context, sp("Answer:", false));
  EXPECT_EQ(t.continuation, sp(" yes", false));  // starts with the lone dummy prefix, as 0.3.0 scored it
  const TokenizedRequest j = tokenize_request({"Answer:", " yes"}, sp, 1, LLProtocol::Harness04);
  EXPECT_EQ(j.continuation, byte_encode(" yes", false));  // split of the joint encoding: no extra prefix
  EXPECT_EQ(parse_protocol("atom"), LLProtocol::Harness03);
  EXPECT_EQ(parse_protocol("lm-eval-0.4"), LLProtocol::Harness04);
  EXPECT_THROW(parse_protocol("0.5"), Error);
}

TEST(ZeroShotTokenize, Llama2TokenizerProtocols) {
  NIBBLE_REQUIRE_DATA("tokenizers/llama2/tokenizer.json");
  const Tokenizer tok = Tokenizer::load(test::data_dir() / "tokenizers/llama2");
  const EncodeFn enc = [&](const std::string& s, bool bos) { return tok.encode(s, bos); };
  const LLRequest yes{"Question: is it?\nAnswer:", " yes"};
  const TokenizedRequest a = tokenize_request(yes, enc, tok.bos_id(), LLProtocol::Harness04);
  EXPECT_EQ(a.context, (std::vector<int32_t>{1, 894, 29901, 338, 372, 29973, 13, 22550, 29901}));
  EXPECT_EQ(a.continuation, (std::vector<int32_t>{4874}));  // "▁yes"
  const TokenizedRequest b = tokenize_request(yes, enc, tok.bos_id(), LLProtocol::Harness03);
  EXPECT_EQ(b.context, (std::vector<int32_t>{894, 29901, 338, 372, 29973, 13, 22550, 29901}));  // no BOS
  EXPECT_EQ(b.continuation, (std::vector<int32_t>{29871, 4874}));  // "▁" "▁yes": the dummy prefix of a separate encode
  const TokenizedRequest w = tokenize_request(
      {"Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."}, enc, tok.bos_id(),
      LLProtocol::Harness04);
  EXPECT_EQ(w.continuation, (std::vector<int32_t>{2337, 2355, 278, 6775, 4251, 29889}));
}

// ---------------------------------------------------------------------------------------------
// Metrics helpers.

TEST(ZeroShotMetrics, MeanStderrAndSubsets) {
  const std::vector<double> xs = {1, 0, 1, 1};
  EXPECT_DOUBLE_EQ(mean_stderr(xs), 0.25);  // sample sd 0.5 / sqrt(4)
  EXPECT_EQ(mean_stderr(std::vector<double>{1}), 0);
  // Python 3: x = list(range(n)); random.Random(seed).shuffle(x)
  EXPECT_EQ(python_shuffled(10, 42), (std::vector<int64_t>{7, 3, 2, 8, 5, 6, 9, 4, 0, 1}));
  EXPECT_EQ(python_shuffled(7, 0), (std::vector<int64_t>{4, 2, 1, 0, 5, 3, 6}));
  const auto p1838 = python_shuffled(1838, 42);
  EXPECT_EQ(std::vector<int64_t>(p1838.begin(), p1838.begin() + 12),
            (std::vector<int64_t>{717, 241, 568, 626, 1139, 296, 1255, 1834, 1752, 695, 573, 68}));
  const auto p100 = python_shuffled(100, 1234);
  EXPECT_EQ(std::vector<int64_t>(p100.begin(), p100.begin() + 12),
            (std::vector<int64_t>{71, 80, 18, 26, 55, 51, 27, 98, 6, 75, 83, 7}));
  const auto big = python_shuffled(20, (uint64_t(1) << 40) + 5);  // a seed of two 32-bit words
  EXPECT_EQ(std::vector<int64_t>(big.begin(), big.begin() + 12),
            (std::vector<int64_t>{9, 7, 17, 13, 4, 18, 5, 6, 10, 11, 3, 14}));
  EXPECT_EQ(select_docs(5, 0), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(select_docs(5, 9), (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(select_docs(10, 3), (std::vector<int64_t>{2, 3, 7}));  // lm-eval 0.3.0 --limit 3
  const auto a = select_docs(1000, 50, 1234), b = select_docs(1000, 50, 1234), c = select_docs(1000, 50, 99);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  ASSERT_EQ(a.size(), 50u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_EQ(std::set<int64_t>(a.begin(), a.end()).size(), 50u);
  EXPECT_LT(a.back(), 1000);
}

// ---------------------------------------------------------------------------------------------
// The data files.

TEST(ZeroShotData, EveryTaskLoadsWithLmEvalCounts) {
  NIBBLE_REQUIRE_DATA("tasks");
  const auto dir = test::data_dir() / "tasks";
  const std::vector<std::pair<std::string, size_t>> counts = {
      {"piqa", 1838},     {"arc_easy", 2376},   {"arc_challenge", 1172},   {"boolq", 3270},
      {"hellaswag", 10042}, {"winogrande", 1267}, {"lambada_openai", 5153}};
  for (const auto& [name, n] : counts) {
    if (!task_available(name, dir)) {
      ADD_FAILURE() << "no data for " << name << " under " << dir;
      continue;
    }
    const Task t = load_task(name, dir);
    EXPECT_EQ(t.docs.size(), n) << name;
    for (const TaskDoc& d : t.docs) {
      ASSERT_GE(d.choices.size(), 1u) << name;
      ASSERT_LT(size_t(d.gold), d.choices.size()) << name;
      if (t.info.has_acc_norm) {
        ASSERT_EQ(d.norm_lengths.size(), d.choices.size()) << name;
      }
    }
    EXPECT_EQ(t.note.empty(), name != "hellaswag") << name;
  }
}

TEST(ZeroShotData, FirstItemsAreLmEvalsStrings) {
  NIBBLE_REQUIRE_DATA("tasks");
  const auto dir = test::data_dir() / "tasks";
  {
    const Task t = load_task("piqa", dir);
    expect_request(t.docs[0], 0, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
                   " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
                   "will also need to supply it with a water bottle and a food dish.");
    EXPECT_EQ(t.docs[0].gold, 0);
  }
  {
    const Task t = load_task("arc_easy", dir);
    expect_request(t.docs[0], 0,
                   "Question: Which statement best explains why photosynthesis is the foundation of most food "
                   "webs?\nAnswer:",
                   " Sunlight is the source of energy for nearly all ecosystems.");
    EXPECT_EQ(t.docs[0].gold, 0);
    EXPECT_EQ(t.docs[93].choices.size(), 3u);  // NYSEDREGENTS_2008_4_6
    size_t five = 0;
    for (const TaskDoc& d : t.docs) five += d.choices.size() == 5;
    EXPECT_EQ(five, 4u);
  }
  {
    const Task t = load_task("boolq", dir);
    const std::string& ctx = t.docs[0].choices[0].context;
    EXPECT_EQ(ctx.substr(0, 30), "Ethanol fuel -- All biomass go");
    EXPECT_EQ(ctx.substr(ctx.size() - 80),
              "ng gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:");
    EXPECT_EQ(t.docs[0].gold, 0);
  }
  {
    const Task t = load_task("hellaswag", dir);
    expect_request(t.docs[0], 3, "Roof shingle removal: A man is sitting on a roof. he",
                   " starts pulling up roofing on a roof.");
    EXPECT_EQ(t.docs[0].gold, 3);
    int gold[4] = {0, 0, 0, 0};
    for (const TaskDoc& d : t.docs) ++gold[d.gold];
    EXPECT_EQ(gold[0], 2515);
    EXPECT_EQ(gold[1], 2485);
    EXPECT_EQ(gold[2], 2584);
    EXPECT_EQ(gold[3], 2458);
    for (const TaskDoc& d : t.docs)  // preprocess removed every [...] span, e.g. "[insert name of town]"
      for (const LLRequest& r : d.choices) ASSERT_EQ(r.continuation.find("[insert"), std::string::npos);
  }
  {
    const Task t = load_task("winogrande", dir);
    expect_request(t.docs[0], 0, "Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.");
    EXPECT_EQ(t.docs[0].gold, 1);
  }
  {
    const Task t = load_task("lambada_openai", dir);
    EXPECT_EQ(t.docs[0].choices[0].continuation, " signs");
  }
}

// ---------------------------------------------------------------------------------------------
// Scoring on stories260K against float64 references.

struct Fixture {
  std::vector<int32_t> ids;
  std::vector<double> logits64;  // [64, 512] numpy float64 port of llama2.c
};

Fixture load_fixture() {
  const Checkpoint ref = Checkpoint::open(test::data_dir() / "models/stories260K/reference_logits.safetensors");
  Fixture f;
  const TensorInfo& ids = ref.get("input_ids");
  for (int64_t i = 0; i < ids.numel(); ++i) f.ids.push_back(int32_t(reinterpret_cast<const int64_t*>(ids.data)[i]));
  const TensorInfo& l = ref.get("logits_numpy_llama2c_fp64");
  EXPECT_EQ(l.dtype, DType::F64);
  const double* p = reinterpret_cast<const double*>(l.data);
  f.logits64.assign(p, p + l.numel());
  return f;
}

// Float64 log-softmax and sum, written out here independently of the scorer.
double logprob64(const double* row, int64_t V, int32_t target) {
  double mx = row[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, row[i]);
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(row[i] - mx);
  return row[target] - mx - std::log(s);
}

// The fixture's float64 log-likelihood of ids[ctx_len:end] given ids[:ctx_len], and is_greedy.
LLResult fixture_ll(const Fixture& f, int64_t ctx_len, int64_t end) {
  const int64_t V = 512;
  LLResult r{0, true};
  for (int64_t t = ctx_len; t < end; ++t) {
    const double* row = f.logits64.data() + (t - 1) * V;
    r.logprob += logprob64(row, V, f.ids[size_t(t)]);
    if (std::max_element(row, row + V) - row != f.ids[size_t(t)]) r.is_greedy = false;
  }
  return r;
}

TokenizedRequest slice(const std::vector<int32_t>& ids, int64_t a, int64_t b, int64_t c) {
  return {std::vector<int32_t>(ids.begin() + a, ids.begin() + b), std::vector<int32_t>(ids.begin() + b, ids.begin() + c)};
}

TEST(ZeroShotScoring, MatchesFloat64ReferenceWithSharedPrefix) {
  NIBBLE_REQUIRE_DATA("models/stories260K/reference_logits.safetensors");
  auto model = Model::load(test::data_dir() / "models/stories260K");
  const Fixture f = load_fixture();
  ASSERT_EQ(f.ids.size(), 64u);
  // One question whose choices share the first 30 tokens: continuations of several lengths, one
  // with a longer context (WinoGrande-like), one single-token continuation (BoolQ-like); a second
  // question with a single choice (LAMBADA-like).
  std::vector<std::vector<TokenizedRequest>> groups = {
      {slice(f.ids, 0, 30, 64), slice(f.ids, 0, 30, 40), slice(f.ids, 0, 30, 31), slice(f.ids, 0, 45, 64)},
      {slice(f.ids, 0, 12, 20)},
  };
  const std::vector<std::vector<std::pair<int64_t, int64_t>>> spans = {{{30, 64}, {30, 40}, {30, 31}, {45, 64}},
                                                                       {{12, 20}}};
  for (int64_t batch : {1, 8}) {
    ScoreOptions opt;
    opt.batch_docs = batch;
    int64_t forwarded = 0;
    const auto got = score_loglikelihood(*model, groups, opt, {}, &forwarded);
    ASSERT_EQ(got.size(), groups.size());
    for (size_t g = 0; g < groups.size(); ++g)
      for (size_t i = 0; i < groups[g].size(); ++i) {
        const LLResult want = fixture_ll(f, spans[g][i].first, spans[g][i].second);
        EXPECT_NEAR(got[g][i].logprob, want.logprob, 2e-4 * (1 + std::abs(want.logprob)))
            << "group " << g << " choice " << i;
        EXPECT_EQ(got[g][i].is_greedy, want.is_greedy) << "group " << g << " choice " << i;
      }
    // The shared prefix went through the model once: 30 + (63-30) + (39-30) + 0 + (63-30) tokens,
    // then 12 + 7 for the second question.
    EXPECT_EQ(forwarded, 30 + 33 + 9 + 0 + 33 + 12 + 7);
  }
}

// Float64 log-likelihood from one plain forward of the (truncated) sequence, without the scorer.
LLResult plain_ll(Model& m, const TokenizedRequest& r, int64_t max_length) {
  std::vector<int32_t> seq = r.context;
  seq.insert(seq.end(), r.continuation.begin(), r.continuation.end());
  if (int64_t(seq.size()) > max_length + 1) seq.erase(seq.begin(), seq.end() - (max_length + 1));
  const std::vector<int32_t> input(seq.begin(), seq.end() - 1);
  auto cache = m.new_cache(int64_t(input.size()));
  const Step step{cache.get(), input, true};
  const std::vector<float> logits = m.forward({&step, 1});
  const int64_t V = m.config().vocab_size, n = int64_t(input.size()),
                c = std::min<int64_t>(int64_t(r.continuation.size()), n);
  LLResult out{0, true};
  std::vector<double> row(static_cast<size_t>(V));
  for (int64_t k = n - c; k < n; ++k) {
    for (int64_t v = 0; v < V; ++v) row[size_t(v)] = logits[size_t(k * V + v)];
    const int32_t target = seq[size_t(k + 1)];
    out.logprob += logprob64(row.data(), V, target);
    if (std::max_element(row.begin(), row.end()) - row.begin() != target) out.is_greedy = false;
  }
  return out;
}

// Twelve questions of random stories260K tokens: 1 to 4 choices sharing a context of 5 to 82
// tokens (beyond a window of 48), every third with a choice whose context has another tail.
std::vector<std::vector<TokenizedRequest>> random_groups() {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> tok(3, 511);
  auto rand_ids = [&](int n) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    for (auto& x : v) x = tok(rng);
    return v;
  };
  std::vector<std::vector<TokenizedRequest>> groups;
  for (int g = 0; g < 12; ++g) {
    const std::vector<int32_t> ctx = rand_ids(5 + g * 7);  // up to 82 tokens: beyond a window of 48
    std::vector<TokenizedRequest> choices;
    for (int i = 0; i < 1 + g % 4; ++i) choices.push_back({ctx, rand_ids(1 + (g + i) % 9)});
    if (g % 3 == 0) {  // a choice with a different context tail (partial evaluation)
      std::vector<int32_t> c2 = ctx;
      c2.push_back(tok(rng));
      choices.push_back({c2, choices[0].continuation});
    }
    groups.push_back(choices);
  }
  return groups;
}

TEST(ZeroShotScoring, LeftTruncationAndBatchingMatchPlainForward) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  auto model = Model::load(test::data_dir() / "models/stories260K");
  const std::vector<std::vector<TokenizedRequest>> groups = random_groups();
  for (int64_t window : {48, 512}) {
    ScoreOptions one, many;
    one.max_length = many.max_length = window;
    one.batch_docs = 1;
    many.batch_docs = 5;
    many.batch_tokens = 100;  // forces uneven batches
    const auto a = score_loglikelihood(*model, groups, one);
    const auto b = score_loglikelihood(*model, groups, many);
    for (size_t g = 0; g < groups.size(); ++g)
      for (size_t i = 0; i < groups[g].size(); ++i) {
        const LLResult want = plain_ll(*model, groups[g][i], window);
        EXPECT_NEAR(a[g][i].logprob, want.logprob, 1e-4 * (1 + std::abs(want.logprob))) << window << " " << g << " " << i;
        EXPECT_NEAR(b[g][i].logprob, want.logprob, 1e-4 * (1 + std::abs(want.logprob))) << window << " " << g << " " << i;
        EXPECT_EQ(a[g][i].is_greedy, want.is_greedy);
        EXPECT_EQ(b[g][i].is_greedy, want.is_greedy);
      }
  }
  // A continuation longer than the window (lm-eval asserts): its last 4 tokens are scored after
  // the token before them, and the result says so.
  ScoreOptions tiny;
  tiny.max_length = 4;
  const std::vector<std::vector<TokenizedRequest>> too_long = {{{{1, 2}, {5, 6, 7, 8, 9}}, {{1, 2}, {5, 6}}}};
  const auto t = score_loglikelihood(*model, too_long, tiny);
  EXPECT_TRUE(t[0][0].truncated);
  EXPECT_FALSE(t[0][1].truncated);
  const TokenizedRequest last{{5}, {6, 7, 8, 9}};
  EXPECT_NEAR(t[0][0].logprob, plain_ll(*model, last, 4).logprob, 1e-4 * (1 + std::abs(t[0][0].logprob)));
  EXPECT_NEAR(t[0][1].logprob, plain_ll(*model, too_long[0][1], 4).logprob, 1e-4 * (1 + std::abs(t[0][1].logprob)));
}

// The CPU executor with every forward call recorded: how many tokens, how many sequences.
class RecordingExecutor final : public Executor {
 public:
  explicit RecordingExecutor(Model& m) : inner_(make_executor(m, RuntimeOptions{})) {}
  const ModelConfig& config() const override { return inner_->config(); }
  KVPool& kv() override { return inner_->kv(); }
  std::string device_name() const override { return inner_->device_name(); }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override {
    int64_t n = 0;
    for (const BatchEntry& e : batch) n += int64_t(e.tokens.size());
    calls.push_back({n, int64_t(batch.size())});
    inner_->forward(batch, logits);
  }
  void forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) override {
    ADD_FAILURE() << "scoring needs the logits, not greedy ids";
    inner_->forward_greedy(batch, ids);
  }
  std::vector<std::pair<int64_t, int64_t>> calls;  // (tokens, sequences) per forward

 private:
  std::unique_ptr<Executor> inner_;
};

// --device cuda sizes its buffers for ScoreOptions::forward_tokens and caps each forward there:
// a batch over the cap goes in several calls (a sequence never split), with the same scores, and
// the scorer leaves no sequence behind in the executor's pool.
TEST(ZeroShotScoring, ForwardCapSplitsBatchesWithoutChangingScores) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  auto model = Model::load(test::data_dir() / "models/stories260K");
  const std::vector<std::vector<TokenizedRequest>> groups = random_groups();
  ScoreOptions opt;
  opt.max_length = 64;
  opt.batch_docs = 12;
  opt.max_forward_tokens = 20;
  RecordingExecutor exec(*model);
  const int64_t capacity = exec.kv().capacity_tokens();
  const auto got = score_loglikelihood(exec, groups, opt);
  EXPECT_EQ(exec.kv().free_tokens(), capacity) << "sequences left in the pool";
  int64_t split = 0;
  for (const auto& [tokens, seqs] : exec.calls) {
    EXPECT_TRUE(tokens <= opt.max_forward_tokens || seqs == 1) << tokens << " tokens in " << seqs << " sequences";
    split += tokens <= opt.max_forward_tokens;
  }
  EXPECT_GT(exec.calls.size(), 2u) << "the cap never split a batch";
  EXPECT_GT(split, 0);
  for (size_t g = 0; g < groups.size(); ++g)
    for (size_t i = 0; i < groups[g].size(); ++i) {
      const LLResult want = plain_ll(*model, groups[g][i], opt.max_length);
      EXPECT_NEAR(got[g][i].logprob, want.logprob, 1e-4 * (1 + std::abs(want.logprob))) << g << " " << i;
      EXPECT_EQ(got[g][i].is_greedy, want.is_greedy) << g << " " << i;
    }
}

TEST(ZeroShotScoring, TaskMetricsFollowTheLogLikelihoods) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  auto model = Model::load(test::data_dir() / "models/stories260K");
  Task task;
  task.info = task_info("piqa");
  task.docs = {piqa_doc("How do I open a jar?", "Twist the lid.", "Twist the lid off slowly with a towel.", 1),
               piqa_doc("Once upon a time", "there was a girl.", "zqx vv.", 0),
               piqa_doc("Lily saw a big ball.", "She was happy.", "She was sad and cried a lot.", 0)};
  ZeroShotOptions opt;
  opt.show_progress = false;
  const TaskResult r = evaluate_task(*model, byte_encode, 1, task, opt);
  ASSERT_EQ(r.n, 3);
  ASSERT_EQ(r.logliks.size(), 3u);
  double acc = 0, acc_norm = 0;
  for (size_t k = 0; k < 3; ++k) {
    const auto& ll = r.logliks[k];
    const auto& d = task.docs[k];
    acc += (ll[1] > ll[0] ? 1 : 0) == d.gold;
    acc_norm += (ll[1] / d.norm_lengths[1] > ll[0] / d.norm_lengths[0] ? 1 : 0) == d.gold;
    // Each log-likelihood equals the plain forward of its tokenized request.
    for (size_t i = 0; i < 2; ++i) {
      const LLResult want =
          plain_ll(*model, tokenize_request(d.choices[i], byte_encode, 1, LLProtocol::Harness04), 512);
      EXPECT_NEAR(ll[i], want.logprob, 1e-4 * (1 + std::abs(want.logprob)));
    }
  }
  EXPECT_DOUBLE_EQ(r.acc, acc / 3);
  EXPECT_DOUBLE_EQ(r.acc_norm, acc_norm / 3);
  const double p = acc / 3;  // stderr of three 0/1 values with mean p
  EXPECT_NEAR(r.acc_stderr, std::sqrt(3 * p * (1 - p) / 2) / std::sqrt(3.0), 1e-12);

  // LAMBADA: acc = is_greedy, ppl = exp(-mean loglik).
  Task lam;
  lam.info = task_info("lambada_openai");
  lam.docs = {lambada_doc("Once upon a time, there was a little girl named Lily", "l"),
              lambada_doc("She went to the park", "l")};
  const TaskResult l = evaluate_task(*model, byte_encode, 1, lam, opt);
  EXPECT_NEAR(l.ppl, std::exp(-(l.logliks[0][0] + l.logliks[1][0]) / 2), 1e-9);
}

TEST(ZeroShotEvaluate, EveryTaskEndToEndOnStories260K) {
  NIBBLE_REQUIRE_DATA("tasks");
  NIBBLE_REQUIRE_DATA("models/stories260K/tokenizer.json");
  const auto model_dir = test::data_dir() / "models/stories260K";
  auto model = Model::load(model_dir);
  const Tokenizer tok = Tokenizer::load(model_dir);
  std::vector<std::string> names;
  for (const TaskInfo& t : known_tasks()) names.push_back(t.name);
  ZeroShotOptions opt;
  opt.tasks_dir = test::data_dir() / "tasks";
  opt.limit = 3;
  opt.seed = 11;
  opt.show_progress = false;
  const ZeroShotResults r = evaluate_tasks(*model, tok, names, opt);
  ASSERT_EQ(r.tasks.size(), names.size());
  EXPECT_TRUE(r.unavailable.empty());
  EXPECT_EQ(r.average_tasks, 6);
  // Every log-likelihood against a plain forward of its tokenized request (truncation included:
  // BoolQ passages run past stories260K's 512 positions), and acc recomputed from them: the first
  // most likely choice against gold, LAMBADA's greedy match and its ppl = exp(-mean loglik).
  const EncodeFn enc = [&](const std::string& s, bool bos) { return tok.encode(s, bos); };
  double sum = 0;
  for (const TaskResult& t : r.tasks) {
    SCOPED_TRACE(t.info.name);
    EXPECT_EQ(t.n, 3);
    EXPECT_GT(t.tokens, 0);
    const Task task = load_task(t.info.name, opt.tasks_dir);
    ASSERT_EQ(t.doc_indices.size(), 3u);
    ASSERT_EQ(t.logliks.size(), 3u);
    double hits = 0, ll_sum = 0;
    for (size_t k = 0; k < 3; ++k) {
      const TaskDoc& doc = task.docs[size_t(t.doc_indices[k])];
      ASSERT_EQ(t.logliks[k].size(), doc.choices.size());
      std::vector<LLResult> want;
      for (size_t i = 0; i < doc.choices.size(); ++i) {
        want.push_back(plain_ll(*model, tokenize_request(doc.choices[i], enc, tok.bos_id(), opt.protocol), 512));
        EXPECT_NEAR(t.logliks[k][i], want[i].logprob, 1e-4 * (1 + std::abs(want[i].logprob))) << "doc " << k;
      }
      if (t.info.kind == TaskKind::LastWord) {
        hits += want[0].is_greedy;
        ll_sum += want[0].logprob;
        continue;
      }
      size_t best = 0;
      for (size_t i = 1; i < want.size(); ++i)
        if (want[i].logprob > want[best].logprob) best = i;
      hits += int(best) == doc.gold;
    }
    EXPECT_DOUBLE_EQ(t.acc, hits / 3);
    // The mean loglik is within the per-choice tolerance, so ppl within that relative error.
    if (t.info.kind == TaskKind::LastWord) {
      EXPECT_NEAR(t.ppl, std::exp(-ll_sum / 3), 1e-4 * (1 + std::abs(ll_sum / 3)) * t.ppl);
    }
    if (!t.info.atom_metric.empty()) sum += t.atom_value();
  }
  EXPECT_NEAR(r.average, sum / 6, 1e-12);
  EXPECT_GT(r.tasks.back().ppl, 1);  // lambada_openai
  const auto j = r.to_json();
  EXPECT_TRUE(j["results"].contains("hellaswag"));
  EXPECT_TRUE(j["results"]["hellaswag"].contains("note"));
  EXPECT_TRUE(j["results"]["piqa"].contains("acc_norm"));
  EXPECT_FALSE(j["results"]["boolq"].contains("acc_norm"));
  EXPECT_NE(r.to_table().find("average (6 of 6"), std::string::npos);
  EXPECT_NE(r.to_csv().find("winogrande,3,1267,"), std::string::npos);

  // A data folder without a task's files: the task is listed as not run, the others still run.
  const auto empty = std::filesystem::temp_directory_path() / "nibble_zero_shot_empty";
  std::filesystem::create_directories(empty);
  opt.tasks_dir = empty;
  const std::vector<std::string> one = {"piqa"};
  const ZeroShotResults none = evaluate_tasks(*model, tok, one, opt);
  EXPECT_TRUE(none.tasks.empty());
  ASSERT_EQ(none.unavailable.size(), 1u);
  EXPECT_NE(none.unavailable[0].find("piqa"), std::string::npos);
  std::filesystem::remove_all(empty);
}

}  // namespace
}  // namespace nibble
