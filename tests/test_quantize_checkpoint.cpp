// `nibble quantize` layer by layer (quant/quantize_checkpoint.h): the streamed file equals, byte
// for byte, the one written from the model quantized in memory (the reference path); an
// interrupted run leaves nothing under the output's name and resumes to the same bytes; a shard
// truncated mid-run is named; the expected size is close and a run that cannot fit is refused.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/core/interrupt.h"
#include "nibble/core/progress.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/io/text_file.h"
#include "nibble/model/model.h"
#include "nibble/quant/quantize_checkpoint.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using quant::Recipe;

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % uint32_t(vocab));
  return t;
}

// stories260K's scaled-down Atom recipe (K = 64 cannot take groups of 128 with 128 keepers).
Recipe small_atom() {
  Recipe r = Recipe::preset("atom-w4a4");
  r.weight.group = r.act.group = 32;
  r.keeper = 8;
  r.calib_windows = 4;
  r.calib_ctx = 128;
  return r;
}

class QuantizeCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    Progress::set_quiet(true);
    dir_ = fs::temp_directory_path() / fmt::format("nibble_qckpt_{}", ::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  quant::CheckpointQuantizeOptions options(const fs::path& model, const std::string& out) const {
    quant::CheckpointQuantizeOptions o;
    o.model = o.tokenizer = model;
    o.out = dir_ / out;
    o.calib_where = "calib";
    o.show_progress = false;
    return o;
  }
  // The reference: the whole model in memory, quantized, then saved (the path before streaming);
  // the file's bytes, and the model's storage_bytes in *weight_bytes.
  std::string in_memory(const fs::path& model, const Recipe& r, const std::vector<int32_t>& calib,
                        int64_t* weight_bytes = nullptr) const {
    auto m = Model::load(model);
    const quant::QuantizeReport rep = quant::quantize_model(*m, r, calib, "calib", false);
    Recipe used = r;
    if (rep.calib_ctx > 0) used.calib_ctx = rep.calib_ctx;
    const fs::path path = dir_ / "in_memory.safetensors";
    save_packed_model(*m, used.to_json().dump(), model, path);
    if (weight_bytes) *weight_bytes = m->storage_bytes();
    return read_bytes(path);
  }
  fs::path dir_;
};

fs::path stories() { return test::data_dir() / "models/stories260K"; }

TEST_F(QuantizeCheckpoint, StreamedEqualsInMemoryOnStories260K) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  const auto calib = random_tokens(4096, 512, 1);
  Recipe compat = small_atom();
  compat.apply_atom_compat();  // three passes, the full-precision stream too
  Recipe keep_fp16 = small_atom();
  keep_fp16.keeper_precision = quant::KeeperPrecision::Fp16;
  for (const Recipe& r : {small_atom(), compat, keep_fp16, Recipe::preset("w8a8"), Recipe::preset("fp16")}) {
    SCOPED_TRACE(r.describe());
    const auto res = quant::quantize_checkpoint(r, calib, options(stories(), "streamed.safetensors"));
    EXPECT_EQ(res.bytes, int64_t(fs::file_size(dir_ / "streamed.safetensors")));
    int64_t weight_bytes = 0;
    EXPECT_TRUE(read_bytes(dir_ / "streamed.safetensors") == in_memory(stories(), r, calib, &weight_bytes))
        << "the streamed file differs from the in-memory path's";
    EXPECT_EQ(res.weight_bytes, weight_bytes);
    EXPECT_FALSE(fs::exists(res.work_dir)) << "the work folder outlived a finished run";
  }
}

// nibble-ref (5 bf16 shards, Atom's shapes) with the default recipe, on a short calibration (8
// windows of 256 tokens of calib.txt: the same passes as 128 x 2048, at CI's speed).
TEST_F(QuantizeCheckpoint, StreamedEqualsInMemoryOnNibbleRefDefaultRecipe) {
  NIBBLE_REQUIRE_DATA("models/nibble-ref/config.json");
  NIBBLE_REQUIRE_DATA("text/calib.txt");
  const fs::path ref = test::data_dir() / "models/nibble-ref";
  Recipe r = Recipe::preset("atom-w4a4");
  r.calib_windows = 8;
  r.calib_ctx = 256;
  std::string text = read_text_file(test::data_dir() / "text/calib.txt");
  text.resize(100000);
  const auto calib = Tokenizer::load(ref).encode(text, true);
  const auto res = quant::quantize_checkpoint(r, calib, options(ref, "ref.safetensors"));
  std::printf("nibble-ref streamed: %.1f s, peak RSS %.0f MB\n", res.report.seconds, double(res.report.peak_rss_bytes) / 1e6);
  EXPECT_TRUE(read_bytes(dir_ / "ref.safetensors") == in_memory(ref, r, calib));
}

TEST_F(QuantizeCheckpoint, InterruptedRunLeavesNoOutputAndResumesToTheSameBytes) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  const auto calib = random_tokens(4096, 512, 2);
  Recipe compat = small_atom();
  compat.apply_atom_compat();
  for (const Recipe& r : {small_atom(), compat}) {
    SCOPED_TRACE(r.describe());
    auto opt = options(stories(), "q.safetensors");
    // A signal before layer 0: an error naming the way on, nothing under the output's name.
    request_interrupt();
    try {
      quant::quantize_checkpoint(r, calib, opt);
      ADD_FAILURE() << "an interrupted run finished";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("interrupted"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("--resume"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(opt.out));
    // Two layers, then stopped (as a crash after layer 1 would leave it); then resumed.
    opt.stop_after_layers = 2;
    auto part = quant::quantize_checkpoint(r, calib, opt);
    EXPECT_EQ(part.bytes, 0);
    EXPECT_EQ(part.layers_done, 2);
    EXPECT_FALSE(fs::exists(opt.out));
    EXPECT_TRUE(fs::exists(quant::partial_dir(opt.out) / "layer-00001.safetensors"));
    opt.stop_after_layers = 0;
    opt.resume = true;
    const auto rest = quant::quantize_checkpoint(r, calib, opt);
    EXPECT_EQ(rest.layers_resumed, 2);
    EXPECT_TRUE(read_bytes(opt.out) == in_memory(stories(), r, calib)) << "the resumed file differs";
    fs::remove(opt.out);
  }
}

TEST_F(QuantizeCheckpoint, ResumeRefusesAnotherRecipeOrCalibration) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  const auto calib = random_tokens(4096, 512, 3);
  auto opt = options(stories(), "q.safetensors");
  opt.stop_after_layers = 1;
  quant::quantize_checkpoint(small_atom(), calib, opt);
  opt.resume = true;
  Recipe other = small_atom();
  other.seed += 1;
  EXPECT_THROW(quant::quantize_checkpoint(other, calib, opt), Error);
  EXPECT_THROW(quant::quantize_checkpoint(small_atom(), random_tokens(4096, 512, 4), opt), Error);
  EXPECT_EQ(quant::quantize_checkpoint(small_atom(), calib, opt).layers_resumed, 1);
}

// A shard that shrinks after it was opened (mapped): the next read names the layer and tensor
// instead of dying of SIGBUS.
TEST_F(QuantizeCheckpoint, ShardTruncatedMidRunNamesLayerAndTensor) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  fs::create_directories(dir_ / "model");
  for (const char* f : {"config.json", "model.safetensors"}) fs::copy_file(stories() / f, dir_ / "model" / f);
  const Checkpoint ckpt = Checkpoint::open(dir_ / "model");
  auto model = Model::open_layers(dir_ / "model", ckpt);
  model->load_layer(ckpt, 0);
  const TensorInfo& t = ckpt.get("model.layers.3.mlp.down_proj.weight");
  fs::resize_file(dir_ / "model/model.safetensors", t.offset + 8);
  try {
    model->load_layer(ckpt, 3);
    FAIL() << "read a layer past the end of its shard";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 3, tensor 'model.layers.3."), std::string::npos)
        << e.what();
  }
}

TEST_F(QuantizeCheckpoint, ExpectedSizeIsCloseAndTooLittleDiskIsRefusedFirst) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  const auto calib = random_tokens(4096, 512, 5);
  const ModelConfig c = ModelConfig::from_file(stories() / "config.json");
  for (const Recipe& r : {small_atom(), Recipe::preset("w8a8"), Recipe::preset("fp16")}) {
    const auto res = quant::quantize_checkpoint(r, calib, options(stories(), "q.safetensors"));
    const double tokenizer = double(fs::file_size(stories() / "tokenizer.json") +
                                    fs::file_size(stories() / "tokenizer_config.json"));
    const double expected = double(quant::expected_packed_bytes(res.recipe, c, 4));  // stories260K is fp32
    EXPECT_NEAR(expected / (double(res.bytes) - tokenizer), 1.0, 0.1) << r.describe();
  }
  EXPECT_THROW(quant::check_free_disk(dir_ / "q.safetensors", dir_ / "work", int64_t(1) << 62), Error);
  quant::check_free_disk(dir_ / "q.safetensors", dir_ / "work", 1000);
}

}  // namespace
}  // namespace nibble
