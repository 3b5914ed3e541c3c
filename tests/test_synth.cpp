// `nibble synth`: a synthetic packed file holds exactly the tensors (names, dtypes, shapes) and
// metadata that `nibble quantize` writes for a model of the same shape; the independent reference
// is the real quantize path run on synth's own fp16 Hugging Face directory. Every synthetic model
// loads, runs a forward pass to finite logits, says it is synthetic, and its bytes depend on the
// seed alone (not on the thread count).
#include <omp.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <random>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/core/progress.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/quantize_model.h"
#include "nibble/quant/synth.h"
#include "tests/test_util.h"
#include "tests/tiny_synth.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kSeed = 5;

quant::SynthOptions tiny(const std::string& recipe) { return test::tiny_synth(recipe, kSeed); }

std::vector<float> logits(Model& m, int64_t n) {
  std::mt19937 rng{uint32_t(kSeed)};
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& t : ids) t = int32_t(rng() % uint32_t(m.config().vocab_size));
  auto cache = m.new_cache(n);
  const Step s{cache.get(), ids, true};
  return m.forward({&s, 1});
}

std::string tensor_table(const SafetensorsFile& f) {
  std::string s;
  for (const auto& [name, t] : f.tensors()) s += fmt::format("{} {} {}\n", name, dtype_name(t.dtype), t.shape_str());
  return s;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

class Synth : public ::testing::Test {
 protected:
  void SetUp() override {
    Progress::set_quiet(true);
    dir = fs::temp_directory_path() / fmt::format("nibble_test_synth_{}", ::getpid());
    fs::create_directories(dir);
    std::printf("seed %llu\n", (unsigned long long)kSeed);
  }
  void TearDown() override { fs::remove_all(dir); }
  fs::path dir;
};

TEST_F(Synth, Fp16IsAHuggingFaceDirectoryThatRuns) {
  const fs::path hf = dir / "hf";
  quant::write_synthetic_model(tiny("fp16"), hf);
  EXPECT_TRUE(fs::exists(hf / "config.json"));
  EXPECT_TRUE(quant::is_synthetic(hf));
  auto m = Model::load(hf);
  EXPECT_EQ(m->config().hidden_size, 256);
  for (float v : logits(*m, 16)) ASSERT_TRUE(std::isfinite(v));
}

// For each recipe, the synthetic packed file against `nibble quantize`'s output (quantize_model +
// save_packed_model, as the CLI runs them) on the synthetic fp16 directory of the same shape.
TEST_F(Synth, PackedFileHasExactlyTheTensorsQuantizeWrites) {
  const fs::path hf = dir / "hf";
  quant::write_synthetic_model(tiny("fp16"), hf);
  std::mt19937 rng{uint32_t(kSeed)};
  std::vector<int32_t> calib(1024);
  for (auto& t : calib) t = int32_t(rng() % 300);
  for (const std::string recipe : {"w8a8", "atom-w4a4", "w4a16-g128"}) {
    SCOPED_TRACE(recipe);
    const quant::SynthOptions opt = tiny(recipe);
    const fs::path synth = dir / (recipe + "-synth.safetensors"), real = dir / (recipe + "-real.safetensors");
    quant::write_synthetic_model(opt, synth);

    auto model = Model::load(hf);
    const quant::QuantizeReport report = quant::quantize_model(*model, opt.recipe, calib, "calib", false);
    quant::Recipe used = opt.recipe;  // as tools/cmd_quantize.cpp records it
    if (report.calib_ctx > 0) used.calib_ctx = report.calib_ctx;
    save_packed_model(*model, used.to_json().dump(), hf, real);

    auto s = SafetensorsFile::open(synth), q = SafetensorsFile::open(real);
    EXPECT_EQ(tensor_table(*s), tensor_table(*q));
    std::map<std::string, std::string> expected = q->metadata();
    expected["nibble.synthetic"] = "true";
    for (const char* key : {"nibble.source", "nibble.source_sha256"})  // what differs: there is no source
      expected[key] = s->metadata().at(key);
    EXPECT_EQ(s->metadata(), expected);

    EXPECT_TRUE(quant::is_synthetic(synth));
    EXPECT_FALSE(quant::is_synthetic(real));
    auto loaded = Model::load(synth);
    const std::vector<float> out = logits(*loaded, 64);
    double sum_sq = 0;
    for (float v : out) {
      ASSERT_TRUE(std::isfinite(v));
      sum_sq += double(v) * v;
    }
    const double rms = std::sqrt(sum_sq / double(out.size()));
    EXPECT_GT(rms, 0.05);  // O(1) logits: the scales neither vanish nor blow up through the layers
    EXPECT_LT(rms, 20.0);
  }
}

TEST_F(Synth, BytesDependOnTheSeedNotTheThreadCount) {
  quant::SynthOptions opt = tiny("atom-w4a4");
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  quant::write_synthetic_model(opt, dir / "a.safetensors");
  omp_set_num_threads(3);
  quant::write_synthetic_model(opt, dir / "b.safetensors");
  omp_set_num_threads(saved);
  opt.seed = kSeed + 1;
  quant::write_synthetic_model(opt, dir / "c.safetensors");
  const std::string a = read_bytes(dir / "a.safetensors");
  EXPECT_TRUE(a == read_bytes(dir / "b.safetensors"));
  EXPECT_FALSE(a == read_bytes(dir / "c.safetensors"));
}

TEST_F(Synth, UnknownShapesAndUnsupportedRecipesAreRefused) {
  EXPECT_THROW(quant::synthetic_shape("llama-2-8b"), Error);
  EXPECT_THROW(quant::write_synthetic_model(tiny("nvfp4"), dir / "x.safetensors"), Error);
  quant::SynthOptions opt = tiny("atom-w4a4");
  opt.config.hidden_size = 192;  // 64 channels left after 128 keepers: no group of 128 fits
  opt.config.head_dim = 48;
  EXPECT_THROW(quant::write_synthetic_model(opt, dir / "x.safetensors"), Error);
}

}  // namespace
}  // namespace nibble
