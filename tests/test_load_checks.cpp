// Hardening of loading and numerics: damaged files, out-of-range configs and non-finite numbers end
// in one nibble::Error naming what is wrong (the CLI: one line, exit 1), never in a signal, a hang,
// a blow-up or a number computed from garbage.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <random>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/core/json.h"
#include "nibble/core/half.h"
#include "nibble/core/parallel.h"
#include "nibble/eval/perplexity.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/quant_linear.h"
#include "nibble/quant/quantize_model.h"
#include "nibble/quant/recipe.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

// A fresh empty folder under the temp directory.
fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("nibble_load_checks_" + name + "_" + std::to_string(getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// The error text of `fn`, "" when it does not throw nibble::Error (anything else propagates).
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, int32_t(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = d(rng);
  return t;
}

const fs::path kFixture = test::source_dir() / "tests/fixtures/llama3-rope";

using TensorEdit = std::function<bool(std::string& name, std::vector<uint8_t>& bytes)>;

// The safetensors file `src` with `edit` applied to each tensor (return false to drop it; the name
// and bytes may be changed), its metadata kept, ready to add more and write.
SafetensorsWriter rewritten(const fs::path& src, const TensorEdit& edit) {
  const auto f = SafetensorsFile::open(src);
  SafetensorsWriter w;
  for (const auto& [k, v] : f->metadata()) w.set_metadata(k, v);
  for (const auto& [name, t] : f->tensors()) {
    std::string n = name;
    std::vector<uint8_t> bytes(t.data, t.data + t.nbytes);
    if (edit(n, bytes)) w.add(n, t.dtype, t.shape, bytes);
  }
  return w;
}

void rewrite(const fs::path& src, const fs::path& dst, const TensorEdit& edit) { rewritten(src, edit).write(dst); }

// A copy of the llama3-rope fixture checkpoint whose config.json is `config` (edited by the caller).
fs::path fixture_copy(const std::string& name, const std::function<void(nlohmann::json&)>& edit_config) {
  const fs::path dir = temp_dir(name);
  fs::copy_file(kFixture / "model.safetensors", dir / "model.safetensors");
  auto config = nlohmann::json::parse(std::ifstream(kFixture / "config.json"));
  edit_config(config);
  std::ofstream(dir / "config.json") << config.dump();
  return dir;
}

// A packed file of the llama3-rope fixture quantized with a reordering W4A4 recipe (or `preset`'s
// formats in groups of 16 and 32).
fs::path packed_fixture(const std::string& name, const std::string& preset = "w4a4-rtn") {
  auto model = Model::load(kFixture);
  quant::Recipe r = quant::Recipe::preset(preset);
  if (preset == "w4a4-rtn") r.weight.group = r.act.group = 16;
  r.reorder = true;
  r.keeper = 16;
  r.calib_windows = 2;
  r.calib_ctx = 64;
  quant::quantize_model(*model, r, random_tokens(512, 256, 7), "calib", false);
  const fs::path path = temp_dir(name) / "packed.safetensors";
  save_packed_model(*model, r.to_json().dump(), kFixture, path);
  return path;
}

// ---- 1. No signal, ever ---------------------------------------------------------------------

// A NaN activation is caught inside quantize_activations' parallel loop: before, the exception
// left the OpenMP region and the runtime called std::terminate (this test process died).
TEST(LoadChecks, NonFiniteActivationInParallelLoopIsAnError) {
  quant::LinearQuantSpec spec;
  spec.act = quant::FormatSpec{quant::Format::Int4Sym, 16, 1, 1.0f};
  const int64_t rows = 64, K = 32;
  std::vector<float> x(size_t(rows * K), 0.5f);
  x[size_t(40 * K + 3)] = std::numeric_limits<float>::quiet_NaN();
  const std::string e = error_of([&] { quant::quantize_activations(x.data(), rows, K, spec); });
  EXPECT_TRUE(contains(e, "NaN")) << e;
}

TEST(LoadChecks, ParallelForRethrowsTheFirstErrorAfterTheRegion) {
  for (const Schedule s : {Schedule::Static, Schedule::Dynamic}) {
    std::atomic<int64_t> done{0};
    const std::string e = error_of([&] {
      parallel_for(1000, [&](int64_t i) {
        if (i == 500) throw Error("row 500", "bad");
        ++done;
      }, true, s);
    });
    EXPECT_EQ(e, "row 500: bad");
    EXPECT_LT(done.load(), 1000);
  }
}

TEST(LoadChecks, NonFiniteWeightIsRefusedNamingTensorAndElement) {
  const fs::path dir = fixture_copy("inf_weight", [](nlohmann::json&) {});
  rewrite(kFixture / "model.safetensors", dir / "model.safetensors", [](std::string& name, auto& bytes) {
    if (name == "model.layers.1.mlp.up_proj.weight") {  // bf16 +inf at element 77
      bytes[2 * 77] = 0x80;
      bytes[2 * 77 + 1] = 0x7f;
    }
    return true;
  });
  const std::string e = error_of([&] { Model::load(dir); });
  EXPECT_TRUE(contains(e, "model.layers.1.mlp.up_proj.weight") && contains(e, "+inf at element 77")) << e;
  fs::remove_all(dir);
}

TEST(LoadChecks, NaNScaleInPackedFileIsRefused) {
  const fs::path path = packed_fixture("nan_scale");
  const fs::path bad = path.parent_path() / "bad.safetensors";
  rewrite(path, bad, [](std::string& name, auto& bytes) {
    if (name == "model.layers.0.self_attn.o_proj.scales") bytes[6] = 0x00, bytes[7] = 0x7e;  // fp16 NaN at element 3
    return true;
  });
  const std::string e = error_of([&] { Model::load(bad); });
  EXPECT_TRUE(contains(e, "model.layers.0.self_attn.o_proj.scales") && contains(e, "NaN at element 3")) << e;
  fs::remove_all(path.parent_path());
}

// An MXFP4 scale of 2^127 (E8M0 code 254) is finite but times any nonzero code overflows: refused at
// load although nothing dequantizes the weights there any more (the GPU reads the codes).
TEST(LoadChecks, ScaleThatOverflowsItsCodesIsRefused) {
  const fs::path path = packed_fixture("overflow_scale", "mxfp4");
  const fs::path bad = path.parent_path() / "bad.safetensors";
  std::vector<uint8_t> first_codes;
  rewrite(path, bad, [&](std::string& name, auto& bytes) {
    if (name == "model.layers.1.mlp.down_proj.codes") first_codes.assign(bytes.begin(), bytes.begin() + 16);
    if (name == "model.layers.1.mlp.down_proj.scales") bytes[0] = 254;  // the first group of row 0
    return true;
  });
  ASSERT_EQ(first_codes.size(), 16u);
  // The first nonzero E2M1 code of that group (a code whose magnitude bits are 0 stays 0).
  int64_t first = -1;
  for (int64_t i = 0; i < 32 && first < 0; ++i)
    if ((first_codes[size_t(i / 2)] >> (4 * (i % 2)) & 0x7) != 0) first = i;
  ASSERT_GE(first, 0) << "the group holds only zeros";
  const std::string e = error_of([&] { Model::load(bad); });
  EXPECT_TRUE(contains(e, "model.layers.1.mlp.down_proj.codes") &&
              contains(e, fmt::format("non-finite value at element {} ", first))) << e;
  fs::remove_all(path.parent_path());
}

// ---- 2. No garbage with exit 0 -------------------------------------------------------------

// A header length a few bytes short (the JSON still parses, its padding cut): every tensor would be
// read from bytes shifted by that much.
TEST(LoadChecks, HeaderLengthShortOfTheHeaderIsRefused) {
  SafetensorsWriter w;
  w.add("x", DType::F32, {3}, std::vector<float>{1, 2, 3});
  std::vector<uint8_t> bytes = w.serialize();
  uint64_t len = 0;
  std::memcpy(&len, bytes.data(), 8);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + int64_t(len));
  // Pad the header with 8 more spaces, then declare it 4 bytes shorter than it is.
  const uint64_t short_len = len + 8 - 4;
  std::string text(8, '\0');
  std::memcpy(text.data(), &short_len, 8);
  text += header + std::string(8, ' ') + std::string(bytes.begin() + 8 + int64_t(len), bytes.end());
  const std::vector<uint8_t> damaged(text.begin(), text.end());
  const std::string e = error_of([&] { SafetensorsFile::parse(damaged, "short.safetensors"); });
  EXPECT_TRUE(contains(e, "wrong header length")) << e;
  // Bytes between two tensors are refused too.
  const std::string gap = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})";
  std::vector<uint8_t> g(8 + gap.size() + 6, 0);
  g[0] = uint8_t(gap.size());
  std::memcpy(g.data() + 8, gap.data(), gap.size());
  EXPECT_TRUE(contains(error_of([&] { SafetensorsFile::parse(g, "gap.safetensors"); }), "belong to no tensor"));
}

TEST(LoadChecks, ConfigWithFewerLayersThanTheCheckpointIsRefused) {
  const fs::path dir = fixture_copy("fewer_layers", [](nlohmann::json& c) { c["num_hidden_layers"] = 1; });
  const std::string e = error_of([&] { Model::load(dir); });
  EXPECT_TRUE(contains(e, "model.layers.1.") && contains(e, "does not use")) << e;
  fs::remove_all(dir);
}

TEST(LoadChecks, PackedFileMissingOrCarryingExtraTensorsIsRefused) {
  const fs::path path = packed_fixture("perm");
  const fs::path bad = path.parent_path() / "bad.safetensors";
  const std::string perm = "model.layers.1.mlp.gate_up_proj.perm";
  ASSERT_TRUE(SafetensorsFile::open(path)->has(perm));
  rewrite(path, bad, [&](std::string& name, auto&) { return name != perm; });
  std::string e = error_of([&] { Model::load(bad); });
  EXPECT_TRUE(contains(e, perm) && contains(e, "missing")) << e;
  rewrite(path, bad, [&](std::string& name, auto&) {
    if (name == perm) name += "_renamed";
    return true;
  });
  e = error_of([&] { Model::load(bad); });
  EXPECT_TRUE(contains(e, perm)) << e;
  SafetensorsWriter extra = rewritten(path, [](std::string&, auto&) { return true; });
  extra.add("model.layers.2.input_layernorm.weight", DType::F32, {64}, std::vector<float>(64, 1.0f));
  extra.write(bad);
  e = error_of([&] { Model::load(bad); });
  EXPECT_TRUE(contains(e, "model.layers.2.input_layernorm.weight") && contains(e, "does not use")) << e;
  EXPECT_EQ(error_of([&] { Model::load(path); }), "");
  fs::remove_all(path.parent_path());
}

// A number past double's range makes nlohmann throw out_of_range (406), not parse_error: found by
// fuzz_recipe (fuzz/corpus/recipe/number_out_of_range.json), it escaped as std::terminate.
TEST(LoadChecks, JsonNumberOutOfRangeIsAnError) {
  for (const char* text : {R"({"act": {"clip": 0.8e99999}})", R"({"rms_norm_eps": -1e400})"}) {
    EXPECT_TRUE(contains(error_of([&] { parse_json(text, "x.json"); }), "not valid JSON")) << text;
    EXPECT_TRUE(contains(error_of([&] { ModelConfig::from_text(text, "config.json"); }), "not valid JSON")) << text;
  }
}

TEST(LoadChecks, ConfigValuesAreRangeAndTypeChecked) {
  const auto base = nlohmann::json::parse(std::ifstream(kFixture / "config.json"));
  struct Case {
    const char* field;
    nlohmann::json value;
  };
  const Case cases[] = {
      {"rms_norm_eps", 0.0},          {"rms_norm_eps", -1e-5},       {"max_position_embeddings", 0},
      {"architectures", {1}},         {"eos_token_id", {"x"}},       {"eos_token_id", 1000},
      {"bos_token_id", 1.5},          {"hidden_size", 1e30},         {"num_hidden_layers", -2},
      {"vocab_size", 4294967296ll},   {"sliding_window", -1},        {"tie_word_embeddings", "no"},
  };
  for (const auto& c : cases) {
    nlohmann::json j = base;
    j[c.field] = c.value;
    const std::string e = error_of([&] { ModelConfig::from_json(j, "config.json"); });
    EXPECT_TRUE(contains(e, c.field)) << c.field << " = " << c.value.dump() << ": " << e;
  }
  for (const double theta : {0.0, -10000.0}) {
    nlohmann::json j = base;
    j["rope_parameters"]["rope_theta"] = theta;
    EXPECT_TRUE(contains(error_of([&] { ModelConfig::from_json(j, "config.json"); }), "rope_theta")) << theta;
  }
  EXPECT_EQ(error_of([&] { ModelConfig::from_json(base, "config.json"); }), "");
}

TEST(LoadChecks, KVClipOutsideZeroToOneIsRefused) {
  auto model = Model::load(kFixture);
  for (const float clip : {0.0f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    KVFormat f{4, false, clip};
    EXPECT_TRUE(contains(error_of([&] { model->set_kv_format(f); }), "--kv-clip")) << clip;
  }
  EXPECT_EQ(error_of([&] { model->set_kv_format(KVFormat{4, false, 1.0f}); }), "");
}

// NaN logits (a weight damaged in memory) used to give ppl nan, and KLD 0 against a base.
TEST(LoadChecks, NonFinitePerplexityAndKLDAreErrors) {
  auto model = Model::load(kFixture), base = Model::load(kFixture);
  model->final_norm()[5] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<int32_t> tokens = random_tokens(200, 256, 3);
  PerplexityOptions opt;
  opt.ctx = 64;
  EXPECT_TRUE(contains(error_of([&] { perplexity(*model, tokens, opt); }), "non-finite logit"));
  EXPECT_TRUE(contains(error_of([&] { perplexity(*model, tokens, opt, base.get()); }), "non-finite logit"));
  EXPECT_TRUE(contains(error_of([&] { perplexity(*base, tokens, opt, model.get()); }), "non-finite logit"));
  EXPECT_EQ(error_of([&] { perplexity(*base, tokens, opt, base.get()); }), "");
}

// ---- 6. No hang, no blow-up ----------------------------------------------------------------

// Opening a FIFO for reading blocks until a writer appears; it must be refused before open().
TEST(LoadChecks, FifoIsRefusedWithoutBlocking) {
  for (const char* fifo_name : {"model.safetensors", "config.json"}) {
    const fs::path dir = temp_dir("fifo");
    fs::copy_file(kFixture / "config.json", dir / "config.json");
    fs::copy_file(kFixture / "model.safetensors", dir / "model.safetensors");
    fs::remove(dir / fifo_name);
    ASSERT_EQ(mkfifo((dir / fifo_name).c_str(), 0600), 0);
    auto load = std::async(std::launch::async, [&] { return error_of([&] { Model::load(dir); }); });
    if (load.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
      // Release the blocked reader so that the test ends.
      const int fd = ::open((dir / fifo_name).c_str(), O_WRONLY | O_NONBLOCK);
      if (fd >= 0) ::close(fd);
      load.wait();
      ADD_FAILURE() << fifo_name << ": loading a FIFO blocked";
    } else {
      const std::string e = load.get();
      EXPECT_TRUE(contains(e, fifo_name) && contains(e, "regular file")) << e;
    }
    fs::remove_all(dir);
  }
}

// nlohmann's callback parser made a header of n entries take O(n²) (40k entries: 13 s).
TEST(LoadChecks, HeaderWithManyEntriesParsesInLinearTime) {
  const int n = 100000;
  std::string header = "{";
  for (int i = 0; i < n; ++i)
    header += fmt::format("{}\"t{}\":{{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[{},{}]}}", i ? "," : "", i, i,
                          i + 1);
  header += "}";
  std::vector<uint8_t> file(8 + header.size() + size_t(n), 0);
  const uint64_t len = header.size();
  std::memcpy(file.data(), &len, 8);
  std::memcpy(file.data() + 8, header.data(), header.size());
  const auto t0 = std::chrono::steady_clock::now();
  const auto f = SafetensorsFile::parse(file, "many.safetensors");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(f->tensors().size(), size_t(n));
  EXPECT_LT(seconds, 10.0) << "parsing " << n << " entries";
}

TEST(LoadChecks, DeeplyNestedHeaderIsRefusedBeforeItIsBuilt) {
  const std::string header = std::string(1000000, '[') + std::string(1000000, ']');
  std::vector<uint8_t> file(8 + header.size());
  const uint64_t len = header.size();
  std::memcpy(file.data(), &len, 8);
  std::memcpy(file.data() + 8, header.data(), header.size());
  const std::string e = error_of([&] { SafetensorsFile::parse(file, "nested.safetensors"); });
  EXPECT_TRUE(contains(e, "nests deeper")) << e;
}

// --calib-windows 100000000 grew until the kernel killed the process; now refused up front.
TEST(LoadChecks, CalibrationBeyondMemoryIsRefusedUpFront) {
  auto model = Model::load(kFixture);
  quant::Recipe r = quant::Recipe::preset("w4a16-g128-gptq");
  r.weight.group = 16;
  r.calib_windows = 100000000;
  r.calib_ctx = 64;
  const std::string e =
      error_of([&] { quant::quantize_model(*model, r, random_tokens(512, 256, 8), "calib.txt", false); });
  EXPECT_TRUE(contains(e, "100000000 calibration windows") && contains(e, "memory")) << e;
}

// ---- The CLI: one line on stderr, exit status 1, no signal ----------------------------------

struct CliRun {
  int status = -1;  // the exit status, or -1 after a signal
  std::string err;
};

CliRun run_cli(const std::string& args) {
  const fs::path err = fs::temp_directory_path() / ("nibble_load_checks_stderr_" + std::to_string(getpid()));
  const int raw = std::system((std::string(NIBBLE_CLI_PATH) + " " + args + " >/dev/null 2>" + err.string()).c_str());
  CliRun r;
  if (WIFEXITED(raw) && WEXITSTATUS(raw) < 128) r.status = WEXITSTATUS(raw);  // the shell reports a signal as 128+n
  std::ifstream in(err);
  r.err.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  fs::remove(err);
  return r;
}

TEST(LoadChecks, CliReportsDamagedModelsInOneLineWithExitStatus1) {
  NIBBLE_REQUIRE_DATA("models/stories260K/tokenizer.json");
  NIBBLE_REQUIRE_DATA("text/heldout.txt");
  const fs::path src = test::data_dir() / "models/stories260K";
  auto model = Model::load(src);
  quant::Recipe r = quant::Recipe::preset("w4a4-rtn");
  quant::quantize_model(*model, r, {}, "calib", false);
  const fs::path dir = temp_dir("cli");
  save_packed_model(*model, r.to_json().dump(), src, dir / "packed.safetensors");
  // A NaN fp16 scale: before, the NaN activations it caused aborted the process (SIGABRT).
  rewrite(dir / "packed.safetensors", dir / "nan.safetensors", [](std::string& name, auto& bytes) {
    if (name == "model.layers.0.self_attn.qkv_proj.scales") bytes[0] = 0x00, bytes[1] = 0x7e;
    return true;
  });
  const std::string text = (test::data_dir() / "text/heldout.txt").string();
  for (const std::string& args : {"perplexity -m " + (dir / "nan.safetensors").string() + " -f " + text + " -c 64 --chunks 1",
                                 "perplexity -m " + (dir / "packed.safetensors").string() + " -f " + text +
                                     " -c 64 --chunks 1 --kv-bits 4 --kv-clip 1.5"}) {
    const CliRun run = run_cli(args);
    EXPECT_EQ(run.status, 1) << args << "\n" << run.err;
    EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << run.err;
    EXPECT_TRUE(contains(run.err, "nibble: error: ")) << run.err;
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace nibble
