// The `nibble` binary as a user runs it (issue 12): outputs never destroy what is there, no name
// becomes gnuplot code, no temporary tokenizer files, one-line errors with exit status 1, and the
// details of generate, eval, quantize and --json. Each test runs the built CLI (NIBBLE_CLI).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <csignal>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "nibble/backend/backend.h"
#include "nibble/io/safetensors.h"
#include "nibble/quant/recipe.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

std::string quote(const std::string& s) {  // one shell word, whatever `s` holds
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Result {
  int status = -1;  // exit status (128 + signal when killed)
  std::string out, err;
  double seconds = 0;
};

// A fresh folder per test, removed afterwards; commands run inside it.
class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / fmt::format("nibble-test-cli-{}-{}", getpid(),
                                                    ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // `nibble ARGS` in the test folder, under `timeout 60` so a blocking command fails the test.
  Result nibble(const std::string& args, const std::string& env = "", const fs::path& cwd = {}) const {
    const fs::path out = dir_ / ".stdout", err = dir_ / ".stderr";
    const std::string cmd = fmt::format("cd {} && {} timeout 60 {} {} >{} 2>{}", quote((cwd.empty() ? dir_ : cwd).string()),
                                        env, quote(NIBBLE_CLI), args, quote(out.string()), quote(err.string()));
    const auto t0 = std::chrono::steady_clock::now();
    const int raw = std::system(cmd.c_str());
    Result r;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
    r.out = read_file(out);
    r.err = read_file(err);
    fs::remove(out);
    fs::remove(err);
    return r;
  }

  static std::string stories() { return (test::data_dir() / "models/stories260K").string(); }
  static std::string sample_text() { return (test::data_dir() / "text/tinystories_valid_sample.txt").string(); }
  // A quantize run that needs no calibration (instant on stories260K).
  static std::string quantize_args(const std::string& model, const std::string& out) {
    return fmt::format("quantize -m {} --recipe w8a8 -o {}", quote(model), quote(out));
  }

  // The user-facing failure: exit status 1 and exactly one line on stderr.
  static void expect_one_line_error(const Result& r) {
    EXPECT_EQ(r.status, 1) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_EQ(r.err.rfind("nibble: error: ", 0), 0u) << r.err;
  }

  fs::path dir_;
};

#define REQUIRE_STORIES() NIBBLE_REQUIRE_DATA("models/stories260K")

TEST_F(Cli, ArgumentErrorsExitOneOnOneLine) {
  expect_one_line_error(nibble("generate --no-such-flag"));
  expect_one_line_error(nibble("generate -p hello"));  // -m missing
  expect_one_line_error(nibble("frobnicate"));
  expect_one_line_error(nibble("generate -m x -n -2"));
  const Result help = nibble("generate --help");
  EXPECT_EQ(help.status, 0);
}

TEST_F(Cli, MissingModelSaysNoSuchFile) {
  const Result r = nibble("generate -m /no/such/model -p hi");
  expect_one_line_error(r);
  EXPECT_NE(r.err.find("no such file"), std::string::npos) << r.err;
}

TEST_F(Cli, TextFileAsModelSaysNotSafetensors) {
  std::ofstream(dir_ / "notes.txt") << "This is a text file, not a model. It is long enough to have a header.\n";
  for (const char* cmd : {"generate -m notes.txt -p hi", "inspect -m notes.txt"}) {
    const Result r = nibble(cmd);
    expect_one_line_error(r);
    EXPECT_NE(r.err.find("not a safetensors file"), std::string::npos) << r.err;
  }
}

// A device node as output (as root, -o /dev/null used to become a regular file). A fresh node
// with /dev/null's numbers stands in for it, so a failing run cannot break this machine.
TEST_F(Cli, DeviceOutputIsRefusedAndStaysADevice) {
  REQUIRE_STORIES();
  fs::path device = dir_ / "null";
  if (mknod(device.c_str(), S_IFCHR | 0666, makedev(1, 3)) != 0) device = "/dev/null";  // not root: harmless
  const Result r = nibble(quantize_args(stories(), device.string()));
  expect_one_line_error(r);
  EXPECT_NE(r.err.find("character device"), std::string::npos) << r.err;
  struct stat st {};
  ASSERT_EQ(lstat(device.c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode)) << device << " is no longer a character device";
}

TEST_F(Cli, FifoOutputIsRefusedWithoutBlocking) {
  NIBBLE_REQUIRE_DATA("tasks/piqa");
  REQUIRE_STORIES();
  ASSERT_EQ(mkfifo((dir_ / "fifo").c_str(), 0666), 0);
  const Result r = nibble(fmt::format("eval -m {} --tasks piqa --limit 2 -q -o fifo", quote(stories())));
  expect_one_line_error(r);  // a blocked open would end in timeout's status 124
  EXPECT_NE(r.err.find("FIFO"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::is_fifo(dir_ / "fifo"));
}

TEST_F(Cli, SymlinkOutputIsRefusedAndItsTargetKept) {
  NIBBLE_REQUIRE_DATA("tasks/piqa");
  REQUIRE_STORIES();
  std::ofstream(dir_ / "victim") << "precious";
  fs::create_symlink(dir_ / "victim", dir_ / "link");
  const Result r = nibble(fmt::format("eval -m {} --tasks piqa --limit 2 -q -o link", quote(stories())));
  expect_one_line_error(r);
  EXPECT_EQ(read_file(dir_ / "victim"), "precious");
  EXPECT_TRUE(fs::is_symlink(dir_ / "link"));
}

TEST_F(Cli, QuantizeRefusesToOverwriteItsInput) {
  REQUIRE_STORIES();
  fs::copy(stories(), dir_ / "model");
  const std::string before = read_file(dir_ / "model/model.safetensors");
  const Result r = nibble(quantize_args("model", "model/model.safetensors"));
  expect_one_line_error(r);
  EXPECT_EQ(read_file(dir_ / "model/model.safetensors"), before) << "the input checkpoint was changed";
  // A new file in the model folder is fine, and no temporary is left beside it.
  ASSERT_EQ(nibble(quantize_args("model", "model/w8a8.safetensors")).status, 0);
  for (const auto& e : fs::directory_iterator(dir_ / "model"))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

// A write that fails half-way (here: a 100 KiB file size limit, SIGXFSZ ignored) leaves neither
// a partial output nor a temporary file (nor quantize's work folder: no layer was finished).
TEST_F(Cli, FailedWriteLeavesNoTemporary) {
  REQUIRE_STORIES();
  const Result r = nibble(quantize_args(stories(), "packed.safetensors"), "ulimit -f 100; trap '' XFSZ;");
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_NE(r.err.find("write failed"), std::string::npos) << r.err;
  for (const auto& e : fs::directory_iterator(dir_)) ADD_FAILURE() << "left behind: " << e.path();
}

TEST_F(Cli, MissingOutputFolderFailsBeforeTheWork) {
  REQUIRE_STORIES();
  const Result r = nibble(fmt::format("quantize -m {} --recipe atom-w4a4 --group 32 --keeper 8 -f {} -o nowhere/x.safetensors",
                                   quote(stories()), quote(sample_text())));
  expect_one_line_error(r);
  EXPECT_NE(r.err.find("does not exist"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("quantizing"), std::string::npos) << "quantized before checking the output: " << r.err;
}

TEST_F(Cli, AblateFileNamesAreNotGnuplotCode) {
  REQUIRE_STORIES();
  const std::string name = "a'.system('touch MARKER').'.txt";
  fs::copy_file(sample_text(), dir_ / name);
  const Result r = nibble(fmt::format("ablate -m {} -f {} --eval {} --ladder-group 32 --ladder-keeper 8 --calib-windows 2 "
                                   "--ctx 64 --chunks 2 -o {}",
                                   quote(stories()), quote(sample_text()), quote(name), quote("out'.system('touch MARKER2').'")));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "MARKER")) << "an --eval file name ran as gnuplot code";
  EXPECT_FALSE(fs::exists(dir_ / "MARKER2")) << "the -o prefix ran as gnuplot code";
  EXPECT_TRUE(fs::exists(dir_ / "out'.system('touch MARKER2').'.csv"));
  const fs::path png = dir_ / "out'.system('touch MARKER2').'.png";
  if (std::system("command -v gnuplot >/dev/null") == 0) {
    EXPECT_EQ(read_file(png).substr(1, 3), "PNG");
  }
}

// atom-w4a4-slot-keepers (issue 20): its per-slot counts are refused by name on a model too narrow for
// them, and an explicit --keeper replaces them rather than being silently ignored.
TEST_F(Cli, SlotKeeperPresetYieldsToAnExplicitKeeper) {
  REQUIRE_STORIES();
  const std::string base = fmt::format(
      "quantize -m {} --recipe atom-w4a4-slot-keepers --group 32 --calib-windows 2 --calib-ctx 64 -f {} ",
      quote(stories()), quote(sample_text()));
  const Result refused = nibble(base + "-o a.safetensors");
  EXPECT_EQ(refused.status, 1);
  EXPECT_NE(refused.err.find("nibble: error: recipe 'atom-w4a4-slot-keepers'"), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find("--keeper 256 must be below"), std::string::npos) << refused.err;
  const Result r = nibble(base + "--keeper 8 --json -o b.safetensors");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("\"keeper\":8,\"keeper_by_slot\":[]"), std::string::npos) << r.out;
}

// nibble split: every row of the table, on a quantized stories260K; a file that is not quantized
// from the model is refused in one line.
TEST_F(Cli, SplitPrintsEveryRow) {
  REQUIRE_STORIES();
  const std::string m = quote(stories()), text = quote(sample_text());
  ASSERT_EQ(nibble(fmt::format("quantize -m {} --recipe atom-w4a4 --group 32 --keeper 8 --calib-windows 2 --calib-ctx 64 "
                               "-f {} -o q.safetensors",
                               m, text))
                .status,
            0);
  const Result r = nibble(fmt::format("split -m {} -q q.safetensors -f {} --ctx 64 --chunks 2 --k-clips 1 --v-clips 0.8 "
                                      "--k-layer-clips 1,0.9,0.9,0.9,0.8 --clip-search 0.7 --search-layers 4 --k-block 16 "
                                      "--k-block-rows channel,token",
                                      m, text));
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* row : {"q.safetensors (as packed)", "layer 4 at full precision", "down activations at full precision",
                          "o weights at full precision", "K at full precision", "V at full precision", "K clip 1 |",
                          "V clip 0.8 |", "K clips [1 0.9 0.9 0.9 0.8] by layer |", "layer 4 K clip 0.7 |",
                          "layer 4 V clip 0.7 |", "K per channel in blocks of 16 tokens, fp16 residual, Hadamard, V as packed |",
                          "K per token in blocks of 16 tokens", "fed in pieces of 16"})
    EXPECT_NE(r.out.find(row), std::string::npos) << row << "\n" << r.out;
  EXPECT_EQ(r.out.find("layer 3 K clip"), std::string::npos) << r.out;  // --search-layers 4 only
  // --rows-on-every-file: each row once per packed file, against one FP run (past the first window).
  const Result each = nibble(fmt::format(
      "split -m {} -q q.safetensors,q.safetensors -f {} --ctx 64 --chunks 2 --parts none --k-clips 1 --rows-on-every-file "
      "--skip-windows 1",
      m, text));
  ASSERT_EQ(each.status, 0) << each.err;
  EXPECT_NE(each.out.find("2 windows of 64 tokens after the first 1"), std::string::npos) << each.out;
  const size_t first = each.out.find("| q.safetensors: K clip 1 |");
  ASSERT_NE(first, std::string::npos) << each.out;
  EXPECT_NE(each.out.find("| q.safetensors: K clip 1 |", first + 1), std::string::npos) << each.out;
  // A per-layer list of the wrong length is refused in one line.
  expect_one_line_error(
      nibble(fmt::format("split -m {} -q q.safetensors -f {} --ctx 64 --chunks 2 --parts none --v-layer-clips 1,1", m, text)));
  expect_one_line_error(nibble(fmt::format("split -m {} -q {} -f {} --ctx 64 --chunks 2", m,
                                           quote((fs::path(stories()) / "model.safetensors").string()), text)));
}

// --residual-rotation reaches the file; split then refuses the rows that put the FP model's layers
// or weights back (they are in the unrotated basis) in one line, and scores the file as packed.
TEST_F(Cli, SplitRefusesLayerRowsOfAResidualRotatedFile) {
  REQUIRE_STORIES();
  const std::string m = quote(stories()), text = quote(sample_text());
  ASSERT_EQ(nibble(fmt::format("quantize -m {} --recipe atom-w4a4 --group 32 --keeper 8 --calib-windows 2 --calib-ctx 64 "
                               "--residual-rotation hadamard -f {} -o q.safetensors",
                               m, text))
                .status,
            0);
  for (const char* parts : {"layers", "slots"}) {
    const Result r = nibble(fmt::format("split -m {} -q q.safetensors -f {} --ctx 64 --chunks 1 --parts {}", m, text, parts));
    expect_one_line_error(r);
    EXPECT_NE(r.err.find("--residual-rotation hadamard"), std::string::npos) << r.err;
  }
  const Result r = nibble(fmt::format("split -m {} -q q.safetensors -f {} --ctx 64 --chunks 1 --parts kv", m, text));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("q.safetensors (as packed)"), std::string::npos) << r.out;
}

// The packed file's tokenizer is read from memory: nothing under $TMPDIR, and a TMPDIR that
// cannot be used does not matter.
TEST_F(Cli, PackedTokenizerWritesNoTemporaryFiles) {
  REQUIRE_STORIES();
  ASSERT_EQ(nibble(quantize_args(stories(), "packed.safetensors")).status, 0);
  fs::create_directory(dir_ / "tmp");
  const std::string args = "tokenize -m packed.safetensors -p 'Once upon a time' --bos --json";
  const Result packed = nibble(args, "TMPDIR=" + quote((dir_ / "tmp").string()));
  ASSERT_EQ(packed.status, 0) << packed.err;
  EXPECT_TRUE(fs::is_empty(dir_ / "tmp"));
  const Result unusable = nibble(args, "TMPDIR=/no/such/folder");
  EXPECT_EQ(unusable.status, 0) << unusable.err;
  // The same ids (BOS included) as the source folder's tokenizer.
  const Result source = nibble(fmt::format("tokenize -m {} -p 'Once upon a time' --bos --json", quote(stories())));
  EXPECT_EQ(packed.out, source.out);
  // generate reads model and tokenizer from one file.
  const Result gen = nibble("generate -m packed.safetensors -p 'Once upon' -n 4", "TMPDIR=/no/such/folder");
  EXPECT_EQ(gen.status, 0) << gen.err;
}

// nibble.source is the folder's name (never a local path) and nibble.source_sha256 the
// checkpoint's SHA-256, checked against coreutils' sha256sum.
TEST_F(Cli, PackedFileRecordsSourceNameAndHash) {
  REQUIRE_STORIES();
  ASSERT_EQ(nibble(quantize_args(stories(), "packed.safetensors")).status, 0);
  const auto f = SafetensorsFile::open(dir_ / "packed.safetensors");
  EXPECT_EQ(f->metadata().at("nibble.source"), "stories260K");
  FILE* p = popen(("sha256sum " + quote(stories() + "/model.safetensors")).c_str(), "r");
  ASSERT_NE(p, nullptr);
  char hex[65] = {};
  ASSERT_EQ(std::fread(hex, 1, 64, p), 64u);
  pclose(p);
  EXPECT_EQ(f->metadata().at("nibble.source_sha256"), std::string(hex));
}

TEST_F(Cli, QuantizeWithoutTokenizerWarnsAndTakesTokenizerOption) {
  REQUIRE_STORIES();
  fs::create_directory(dir_ / "model");
  for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(fs::path(stories()) / f, dir_ / "model" / f);
  const Result bare = nibble(quantize_args("model", "bare.safetensors") + " --json");
  ASSERT_EQ(bare.status, 0) << bare.err;
  EXPECT_NE(bare.err.find("warning: "), std::string::npos) << bare.err;
  EXPECT_NE(bare.err.find("no tokenizer"), std::string::npos) << bare.err;
  EXPECT_EQ(nlohmann::json::parse(bare.out).at("warnings").size(), 1u) << bare.out;
  EXPECT_EQ(nibble("tokenize -m bare.safetensors -p hi").status, 1);
  // --tokenizer on the command that reads the file, and on quantize to embed one.
  EXPECT_EQ(nibble(fmt::format("tokenize -m bare.safetensors --tokenizer {} -p hi", quote(stories()))).status, 0);
  const Result with = nibble(quantize_args("model", "with.safetensors") + " --tokenizer " + quote(stories() + "/tokenizer.json"));
  ASSERT_EQ(with.status, 0) << with.err;
  EXPECT_EQ(with.err.find("warning"), std::string::npos) << with.err;
  EXPECT_EQ(nibble("tokenize -m with.safetensors -p hi").status, 0);
}

TEST_F(Cli, GenerateKeepsTheSpaceAfterThePrompt) {
  REQUIRE_STORIES();
  const Result r = nibble(fmt::format("generate -m {} -p 'Once upon' -n 4", quote(stories())));
  ASSERT_EQ(r.status, 0) << r.err;
  ASSERT_GT(r.out.size(), 11u) << r.out;
  EXPECT_EQ(r.out.substr(0, 10), "Once upon ") << r.out;  // greedy: "Once upon a time"
  EXPECT_NE(r.out[10], ' ') << r.out;
}

// --tp on the CPU: the ranks as threads give the greedy text of one executor; a degree the heads
// do not divide is one line naming the count.
TEST_F(Cli, GenerateWithTensorParallelism) {
  REQUIRE_STORIES();
  const std::string args = fmt::format("generate -m {} -p 'Once upon' -n 12 --device cpu", quote(stories()));
  const Result one = nibble(args), two = nibble(args + " --tp 2");
  ASSERT_EQ(one.status, 0) << one.err;
  ASSERT_EQ(two.status, 0) << two.err;
  EXPECT_EQ(two.out, one.out);
  EXPECT_NE(two.err.find("device: cpu x2 (tensor parallel)"), std::string::npos) << two.err;
  const Result three = nibble(args + " --tp 3");
  expect_one_line_error(three);
  EXPECT_NE(three.err.find("num_attention_heads 8 is not divisible by 3 ranks"), std::string::npos) << three.err;
  expect_one_line_error(nibble(args + " --tp 0"));
}

TEST_F(Cli, GenerateCountZeroAndMinusOne) {
  REQUIRE_STORIES();
  const Result zero = nibble(fmt::format("generate -m {} -p 'Once upon' -n 0", quote(stories())));
  ASSERT_EQ(zero.status, 0) << zero.err;
  EXPECT_EQ(zero.out, "Once upon\n");
  // -n -1: until end of sequence or the context (512 tokens) is full.
  const Result all = nibble(fmt::format("generate -m {} -p 'Once upon' -n -1", quote(stories())));
  ASSERT_EQ(all.status, 0) << all.err;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(all.err, m, std::regex("prompt: (\\d+) tokens.*generated: (\\d+) tokens"))) << all.err;
  EXPECT_GT(std::stoi(m[2]), 0);
  EXPECT_LE(std::stoi(m[1]) + std::stoi(m[2]), 512 + 1);  // the last token needs no position of its own
}

TEST_F(Cli, BenchRunsEveryRequestAndReportsTheEngine) {
  REQUIRE_STORIES();
  // A pool of 12 pages for 24 requests of up to 160 tokens: the engine has to preempt.
  const Result r = nibble(fmt::format("bench -m {} --device cpu --num-prompts 24 --dist atom --max-len 160 "
                                      "--kv-pages 12 --max-batch-tokens 64 --json",
                                      quote(stories())));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("completed"), 24);
  EXPECT_EQ(j.at("refused"), 0);
  EXPECT_GT(j.at("output_tokens_per_s").get<double>(), 0);
  EXPECT_GT(j.at("preemptions").get<int>(), 0);
  EXPECT_LE(j.at("peak_pages").get<int>(), 12);
  EXPECT_GE(j.at("prefix_hit_tokens").get<int>(), 0);
  EXPECT_LE(j.at("ttft_p50_ms").get<double>(), j.at("ttft_p99_ms").get<double>());
  // The time split: every step ran the model, batches of 1..(pool-bound) sequences, inside the wall time.
  EXPECT_GT(j.at("steps").get<int>(), 0);
  EXPECT_GE(j.at("mean_batch").get<double>(), 1.0);
  EXPECT_GT(j.at("forward_s").get<double>(), 0);
  EXPECT_LE(j.at("schedule_s").get<double>() + j.at("forward_s").get<double>() + j.at("sample_and_stream_s").get<double>(),
            j.at("duration_s").get<double>());
  const Result csv = nibble(fmt::format("bench -m {} --device cpu --num-prompts 2 --prompt-len 4 --output-len 3 --csv",
                                        quote(stories())));
  ASSERT_EQ(csv.status, 0) << csv.err;
  EXPECT_NE(csv.out.find("completed,"), std::string::npos) << csv.out;
  expect_one_line_error(nibble(fmt::format("bench -m {} --json --csv", quote(stories()))));
}

// A list of rates sweeps the load over one loaded model: one run per rate, each on an empty pool
// (the 12 pages would not hold a run that inherited the last one's prefix cache), and the curve.
TEST_F(Cli, BenchSweepsRatesAndDrawsTheCurve) {
  REQUIRE_STORIES();
  const fs::path png = dir_ / "curve.png";
  const bool gnuplot = std::system("command -v gnuplot >/dev/null") == 0;
  const Result r = nibble(fmt::format("bench -m {} --device cpu --num-prompts 6 --prompt-len 40 --output-len 8 "
                                      "--kv-pages 12 --rate 400,0 {} --json",
                                      quote(stories()), gnuplot ? "--plot " + quote(png.string()) : ""));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j.is_array()) << r.out;
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0].at("rate"), 400.0);
  EXPECT_EQ(j[1].at("rate"), 0.0);
  for (const auto& run : j) {
    EXPECT_EQ(run.at("completed"), 6);
    EXPECT_EQ(run.at("output_tokens"), 48);
    EXPECT_GT(run.at("tpot_mean_ms").get<double>(), 0);
    EXPECT_GT(run.at("model_read_s").get<double>(), 0);
    EXPECT_GE(run.at("executor_setup_s").get<double>(), 0);
  }
  if (gnuplot) {
    EXPECT_EQ(read_file(png).substr(1, 3), "PNG");
  }
}

// --plot without a working gnuplot is refused before the model loads (a device run once lost a
// 10-minute sweep's results to it at the end); a gnuplot that fails stands in for a missing one.
TEST_F(Cli, BenchPlotWithoutGnuplotFailsBeforeTheWork) {
  REQUIRE_STORIES();
  const fs::path bin = dir_ / "fakebin";
  fs::create_directories(bin);
  std::ofstream(bin / "gnuplot") << "#!/bin/sh\nexit 1\n";
  fs::permissions(bin / "gnuplot", fs::perms::owner_all);
  const Result r = nibble(fmt::format("bench -m {} --device cpu --num-prompts 2 --output-len 4 --plot {} --json",
                                      quote(stories()), quote((dir_ / "curve.png").string())),
                          "PATH=" + quote(bin.string()) + ":\"$PATH\"");
  expect_one_line_error(r);
  EXPECT_NE(r.err.find("gnuplot"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("bench:"), std::string::npos) << "the benchmark ran first: " << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "curve.png"));
}

// A socket bound to a loopback port of the kernel's pick; its port in *port.
int loopback_socket(int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  *port = ntohs(addr.sin_port);
  return fd;
}

// A loopback port nothing listens on now (the kernel's pick, closed again).
int free_port() {
  int port = 0;
  close(loopback_socket(&port));
  return port;
}

// `nibble serve` on stories260K (CPU, one thread) as a child process on a free loopback port,
// ready once /health answers (at most 60 s); SIGTERM at the end.
class ServeProcess {
 public:
  ServeProcess(const std::string& model, const fs::path& log) : port_(free_port()) {
    const std::string port = std::to_string(port_);
    const char* argv[] = {NIBBLE_CLI, "serve", "-m", model.c_str(), "--device", "cpu", "--port", port.c_str(), "-t", "1", nullptr};
    posix_spawn_file_actions_t io;
    posix_spawn_file_actions_init(&io);
    posix_spawn_file_actions_addopen(&io, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&io, 1, 2);
    EXPECT_EQ(posix_spawn(&pid_, NIBBLE_CLI, &io, nullptr, const_cast<char**>(argv), environ), 0);
    posix_spawn_file_actions_destroy(&io);
    httplib::Client c("127.0.0.1", port_);
    for (int i = 0; i < 600 && !ready_; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      const auto res = c.Get("/health");
      ready_ = res && res->status == 200;
      if (!ready_) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ~ServeProcess() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 100 && waitpid(pid_, nullptr, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (kill(pid_, SIGKILL) == 0) waitpid(pid_, nullptr, 0);  // still there after 10 s
  }
  bool ready() const { return ready_; }
  std::string url() const { return fmt::format("http://127.0.0.1:{}", port_); }

 private:
  int port_;
  pid_t pid_ = -1;
  bool ready_ = false;
};

// bench-serve against `nibble serve`: every request completes with exactly the prompt and output
// tokens it asked for (the server's usage counts), at two rates and with Atom's lengths; the report
// has its latencies in order, the CSV its header, and --plot its PNG.
TEST_F(Cli, BenchServeMeasuresAServerOnLoopback) {
  REQUIRE_STORIES();
  ServeProcess server(stories(), dir_ / "serve.log");
  ASSERT_TRUE(server.ready()) << read_file(dir_ / "serve.log");
  const fs::path png = dir_ / "curve.png";
  const Result r = nibble(fmt::format("bench-serve --url {} --num-prompts 6 --prompt-len 5 --output-len 7 "
                                      "--vocab-size 512 --rates 50,0 --plot {} --json",
                                      server.url(), quote(png.string())));
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_TRUE(j.is_array()) << r.out;
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0].at("rate"), 50.0);
  EXPECT_EQ(j[1].at("rate"), 0.0);
  for (const auto& run : j) {
    EXPECT_EQ(run.at("model"), "stories260K");
    EXPECT_EQ(run.at("completed"), 6) << r.err;
    EXPECT_EQ(run.at("errors"), 0);
    EXPECT_EQ(run.at("requested_prompt_tokens"), 30);
    EXPECT_EQ(run.at("prompt_tokens"), 30);
    EXPECT_EQ(run.at("requested_output_tokens"), 42);
    EXPECT_EQ(run.at("output_tokens"), 42);
    EXPECT_GT(run.at("requests_per_s").get<double>(), 0);
    EXPECT_GT(run.at("output_tokens_per_s").get<double>(), 0);
    for (const char* name : {"ttft", "tpot", "itl"}) {
      const double p50 = run.at(fmt::format("{}_p50_ms", name)), p90 = run.at(fmt::format("{}_p90_ms", name)),
                   p99 = run.at(fmt::format("{}_p99_ms", name));
      EXPECT_GT(p50, 0) << name;
      EXPECT_LE(p50, p90) << name;
      EXPECT_LE(p90, p99) << name;
    }
  }
  if (std::system("command -v gnuplot >/dev/null") == 0) {
    EXPECT_EQ(read_file(png).substr(1, 3), "PNG");
  }
  const Result atom = nibble(fmt::format("bench-serve --url {} --num-prompts 5 --dist atom --max-len 40 --vocab-size 512 "
                                         "--rates 0 --seed 7 --json",
                                         server.url()));
  ASSERT_EQ(atom.status, 0) << atom.err;
  const auto a = nlohmann::json::parse(atom.out);
  EXPECT_EQ(a.at("completed"), 5) << atom.err;
  EXPECT_GT(a.at("requested_output_tokens").get<int>(), 5);
  EXPECT_EQ(a.at("output_tokens"), a.at("requested_output_tokens"));
  EXPECT_EQ(a.at("prompt_tokens"), a.at("requested_prompt_tokens"));
  const Result csv = nibble(fmt::format("bench-serve --url {} --num-prompts 1 --prompt-len 2 --output-len 2 "
                                        "--vocab-size 512 --csv",
                                        server.url()));
  ASSERT_EQ(csv.status, 0) << csv.err;
  EXPECT_EQ(csv.out.rfind("url,model,", 0), 0u) << csv.out;
}

// What bench-serve refuses, each in one line with exit status 1: a server that is not there, a URL
// that is not http, a rate that is not a non-negative number.
TEST_F(Cli, BenchServeRefusesBadInput) {
  const std::string nobody = fmt::format("http://127.0.0.1:{}", free_port());
  const Result gone = nibble("bench-serve --url " + nobody + " --num-prompts 1");
  expect_one_line_error(gone);
  EXPECT_NE(gone.err.find("cannot reach " + nobody), std::string::npos) << gone.err;
  const Result scheme = nibble("bench-serve --url ftp://127.0.0.1:1");
  expect_one_line_error(scheme);
  EXPECT_NE(scheme.err.find("not an http:// or https:// URL"), std::string::npos) << scheme.err;
  for (const char* rates : {"1,x", "-2"}) {
    const Result bad = nibble(fmt::format("bench-serve --url {} --rates {}", nobody, rates));
    expect_one_line_error(bad);
    EXPECT_NE(bad.err.find("is not a rate"), std::string::npos) << rates << ": " << bad.err;
  }
}

TEST_F(Cli, EveryCommandTakesThreads) {
  REQUIRE_STORIES();
  for (const char* cmd : {"generate", "perplexity", "tokenize", "inspect", "quantize", "ablate", "split", "eval", "bench",
                          "serve", "bench-serve"}) {
    const Result help = nibble(std::string(cmd) + " --help");
    EXPECT_NE(help.out.find("-t,--threads"), std::string::npos) << cmd;
  }
  for (const char* t : {"1", "2"})
    EXPECT_EQ(nibble(fmt::format("generate -m {} -p 'Once' -n 4 -t {}", quote(stories()), t)).status, 0);
  expect_one_line_error(nibble(fmt::format("generate -m {} -p 'Once' -n 4 -t 0", quote(stories()))));
}

// A chat template nibble cannot render stops `serve` at start, before it loads or listens.
TEST_F(Cli, ServeRefusesAChatTemplateItCannotRender) {
  const Result named = nibble("serve -m . --chat-template vicuna --port 0");
  expect_one_line_error(named);
  EXPECT_NE(named.err.find("unknown chat template 'vicuna'"), std::string::npos) << named.err;
  fs::create_directories(dir_ / "model");
  std::ofstream(dir_ / "model/tokenizer_config.json") << R"({"chat_template": "{{ '### Human: ' + m.content }}"})";
  const Result model = nibble("serve -m model --port 0");
  expect_one_line_error(model);
  EXPECT_NE(model.err.find("tokenizer_config.json: chat_template is none of the formats"), std::string::npos) << model.err;
}

// A port something else listens on stops `serve` before it loads the model (it printed "model loaded"
// first, and with a 70B model that was minutes), with the system's reason.
TEST_F(Cli, ServeRefusesATakenPortBeforeLoading) {
  REQUIRE_STORIES();
  int port = 0;
  const int fd = loopback_socket(&port);
  ASSERT_EQ(listen(fd, 1), 0);
  const Result r = nibble(fmt::format("serve -m {} --device cpu --port {}", quote(stories()), port));
  close(fd);
  expect_one_line_error(r);
  EXPECT_NE(r.err.find(fmt::format("cannot listen on 127.0.0.1:{}: Address already in use", port)), std::string::npos)
      << r.err;
}

// SIGTERM drains `serve`: a stream mid-generation is answered to its [DONE] (every choice to its
// length), then the process exits 0.
TEST_F(Cli, ServeDrainsOnSigtermAndExitsZero) {
  REQUIRE_STORIES();
  const fs::path log = dir_ / "serve.log", rc = dir_ / "rc", pid_file = dir_ / "pid";
  // Not under `timeout`, which would pass the signal on twice (to the child and to its group):
  // a second signal stops at once. The test kills it if it outlives the waits below.
  std::system(fmt::format("(sh -c 'echo $$ >{}; exec {} serve -m {} --device cpu --port 0 -t 1' 2>{}; echo $? >{}) &",
                          quote(pid_file.string()), quote(NIBBLE_CLI), quote(stories()), quote(log.string()), quote(rc.string()))
                  .c_str());
  auto wait_for = [](auto done) {
    for (int i = 0; i < 3000 && !done(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return done();
  };
  std::smatch url;
  std::string text;
  const bool listening = wait_for([&] {
    text = read_file(log);
    return std::regex_search(text, url, std::regex("http://127.0.0.1:([0-9]+)"));
  });
  ASSERT_TRUE(wait_for([&] { return !read_file(pid_file).empty(); }));
  const pid_t pid = std::stoi(read_file(pid_file));
  if (!listening) {
    ::kill(pid, SIGKILL);
    FAIL() << "serve did not start: " << text;
  }
  std::string stream;
  std::atomic<bool> streaming{false};
  std::thread client([&] {
    httplib::Client c("127.0.0.1", std::stoi(url[1]));
    c.set_read_timeout(60);
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = R"({"prompt": "Once", "max_tokens": 480, "n": 8, "temperature": 0, "stream": true})";
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      stream.append(data, n);
      streaming = true;
      return true;
    };
    httplib::Response res;
    httplib::Error err;
    EXPECT_TRUE(c.send(req, res, err)) << httplib::to_string(err);
  });
  EXPECT_TRUE(wait_for([&] { return streaming.load(); }));
  ::kill(pid, SIGTERM);
  client.join();
  if (!wait_for([&] { return fs::exists(rc) && !read_file(rc).empty(); })) {
    ::kill(pid, SIGKILL);
    FAIL() << "serve did not exit after SIGTERM: " << read_file(log);
  }
  EXPECT_EQ(read_file(rc), "0\n") << read_file(log);
  EXPECT_NE(read_file(log).find("draining"), std::string::npos);
  ASSERT_GE(stream.size(), 14u);
  EXPECT_EQ(stream.substr(stream.size() - 14), "data: [DONE]\n\n");
  size_t finished = 0;
  for (size_t at = 0; (at = stream.find(R"("finish_reason":"length")", at)) != std::string::npos; ++at) ++finished;
  EXPECT_EQ(finished, 8u);
}

// Run from / with no NIBBLE_DATA: the task data is found beside the checkout the binary is in.
TEST_F(Cli, EvalFindsTaskDataFromAnyFolder) {
  REQUIRE_STORIES();
  if (!fs::is_directory(test::source_dir() / "../shared/data/tasks/piqa"))
    GTEST_SKIP() << "no shared/data/tasks beside the checkout";
  const Result r = nibble(fmt::format("eval -m {} --tasks piqa --limit 2 -q --json", quote(stories())), "env -u NIBBLE_DATA", "/");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(nlohmann::json::parse(r.out).is_object());
}

// eval runs on an executor (--device) and says which: in the table's header and in --json.
TEST_F(Cli, EvalSaysWhichDeviceRan) {
  NIBBLE_REQUIRE_DATA("tasks/piqa");
  REQUIRE_STORIES();
  const Result j = nibble(fmt::format("eval -m {} --tasks piqa --limit 2 -q --json --device cpu", quote(stories())));
  ASSERT_EQ(j.status, 0) << j.err;
  EXPECT_EQ(nlohmann::json::parse(j.out)["config"]["device"], "cpu") << j.out;
  const Result t = nibble(fmt::format("eval -m {} --tasks piqa --limit 2 -q --device cpu", quote(stories())));
  ASSERT_EQ(t.status, 0) << t.err;
  EXPECT_NE(t.out.find("| device cpu |"), std::string::npos) << t.out;
  std::string why;
  if (!cuda_device_available(&why))  // --device cuda without a GPU: one line, exit 1, no fallback
    expect_one_line_error(nibble(fmt::format("eval -m {} --tasks piqa --limit 2 -q --device cuda", quote(stories()))));
}

// --device cuda without a usable GPU is refused when the option is parsed, before a model is read: the
// error names the device even where the model path does not exist (reading a 7B fp16 checkpoint first
// could exhaust a CPU machine's memory before the executor said no).
TEST_F(Cli, DeviceCudaWithoutAGpuFailsBeforeReadingTheModel) {
  std::string why;
  if (cuda_device_available(&why)) GTEST_SKIP() << "a usable GPU is present";
  const std::string missing = quote((dir_ / "no-such-model").string());
  const std::vector<std::string> commands = {"generate -p hi -n 1", "bench --num-prompts 1", "serve", "perplexity",
                                             "quantize -o " + quote((dir_ / "out.nibble").string())};
  for (const std::string& cmd : commands) {
    const Result r = nibble(fmt::format("{} -m {} --device cuda", cmd, missing));
    expect_one_line_error(r);
    EXPECT_NE(r.err.find("--device cuda"), std::string::npos) << cmd << ": " << r.err;
    EXPECT_EQ(r.err.find("no-such-model"), std::string::npos) << cmd << ": " << r.err;
  }
}

TEST_F(Cli, QuantizeHelpQuotesThePresetClips) {
  const Result r = nibble("quantize --help");
  ASSERT_EQ(r.status, 0);
  const quant::Recipe atom = quant::Recipe::preset("atom-w4a4");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex("activation clip ratio \\(atom-w4a4: ([0-9.]+)\\)"))) << r.out;
  EXPECT_FLOAT_EQ(std::stof(m[1]), atom.act.clip);
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex("weight clip ratio \\(atom-w4a4: ([0-9.]+)\\)"))) << r.out;
  EXPECT_FLOAT_EQ(std::stof(m[1]), atom.weight.clip);
}

// --json: the whole stdout is one JSON object (progress, tables and logs go to stderr).
TEST_F(Cli, JsonOutputIsOneObject) {
  REQUIRE_STORIES();
  const std::string m = quote(stories()), text = quote(sample_text());
  std::vector<std::string> commands = {
      "perplexity -m " + m + " -f " + text + " --ctx 64 --chunks 2 --json",
      quantize_args(stories(), "q.safetensors") + " --json",
      "inspect -m " + m + " --json",
      "tokenize -m " + m + " -p hi --json",
      "ablate -m " + m + " -f " + text + " --eval " + text +
          " --ladder-group 32 --ladder-keeper 8 --calib-windows 2 --ctx 64 --chunks 2 --json"};
  if (fs::is_directory(test::data_dir() / "tasks/piqa"))
    commands.push_back("eval -m " + m + " --tasks piqa --limit 2 --json --data " + quote((test::data_dir() / "tasks").string()));
  for (const std::string& c : commands) {
    const Result r = nibble(c);
    ASSERT_EQ(r.status, 0) << c << "\n" << r.err;
    nlohmann::json j;
    EXPECT_NO_THROW(j = nlohmann::json::parse(r.out)) << c << "\nstdout: " << r.out;
    EXPECT_TRUE(j.is_object()) << c;
  }
}

// A quantize run logged with --json still says how far it is on stderr (a 7B run takes minutes a
// layer on a CPU; a device log once held nothing but its first line).
TEST_F(Cli, QuantizeJsonKeepsItsProgressOnStderr) {
  REQUIRE_STORIES();
  const Result r = nibble(quantize_args(stories(), "q.safetensors") + " --json");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("quantize: 5/5 layers (100%)"), std::string::npos) << r.err;
  EXPECT_TRUE(nlohmann::json::accept(r.out)) << r.out;
}

}  // namespace
}  // namespace nibble
