// A quantized file and the logits are a function of the inputs, not of the machine: quantizing
// stories260K (Atom's recipe scaled to it: group 32, 8 keepers, GPTQ, Hadamard, KV4) with 1, 2
// and 3 OpenMP/OpenBLAS threads writes the same bytes, and a forward pass gives the same logits.
#include <cblas.h>
#include <omp.h>

#include <fstream>
#include <iterator>
#include <random>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/quantize_model.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

constexpr uint32_t kSeed = 7;

// Sets the OpenMP and OpenBLAS thread counts for one scope, then restores them.
class Threads {
 public:
  explicit Threads(int n) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(n);
    openblas_set_num_threads(n);
  }
  ~Threads() {
    omp_set_num_threads(saved_);
    openblas_set_num_threads(saved_);
  }

 private:
  int saved_;
};

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = int32_t(rng() % uint32_t(vocab));
  return t;
}

std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

class Determinism : public ::testing::Test {
 protected:
  void SetUp() override { NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors"); }

  std::filesystem::path stories() const { return test::data_dir() / "models/stories260K"; }

  // Quantizes stories260K with `threads` threads and returns the packed file's path.
  std::filesystem::path quantize_with(int threads) {
    Threads scope(threads);
    auto model = Model::load(stories());
    quant::Recipe r = quant::Recipe::preset("atom-w4a4");
    r.weight.group = r.act.group = 32;
    r.keeper = 8;
    r.calib_windows = 4;
    r.calib_ctx = 512;  // big enough products that OpenBLAS threads them
    r.seed = kSeed;
    quant::quantize_model(*model, r, random_tokens(4096, 512, kSeed), "calib", false);
    const auto path = std::filesystem::temp_directory_path() / fmt::format("nibble_determinism_t{}.safetensors", threads);
    save_packed_model(*model, r.to_json().dump(), stories(), path);
    return path;
  }

  std::vector<float> logits_with(int threads, const std::filesystem::path& model_path,
                                 const std::vector<int32_t>& ids) {
    Threads scope(threads);
    auto model = Model::load(model_path);
    auto cache = model->new_cache(int64_t(ids.size()));
    const Step s{cache.get(), ids, true};
    return model->forward({&s, 1});
  }
};

// The tensors of two packed files whose bytes differ, for the failure message.
std::string differing_tensors(const std::filesystem::path& a, const std::filesystem::path& b) {
  auto fa = SafetensorsFile::open(a), fb = SafetensorsFile::open(b);
  std::string names;
  int count = 0;
  for (const auto& [name, t] : fa->tensors()) {
    const TensorInfo& u = fb->get(name);
    if (t.nbytes != u.nbytes || !std::equal(t.data, t.data + t.nbytes, u.data)) {
      ++count;
      if (count <= 5) names += " " + name;
    }
  }
  return fmt::format("{} of {} tensors differ:{}", count, fa->tensors().size(), names);
}

TEST_F(Determinism, PackedFileIndependentOfThreadCount) {
  std::printf("seed %u\n", kSeed);
  const auto one = quantize_with(1);
  const std::string expected = read_bytes(one);
  for (int threads : {2, 3}) {
    const auto other = quantize_with(threads);
    EXPECT_TRUE(read_bytes(other) == expected) << threads << " threads vs 1: " << differing_tensors(one, other);
    std::filesystem::remove(other);
  }
  std::filesystem::remove(one);
}

// A window as perplexity scores it (512 tokens, the whole context), with the full-precision model.
TEST_F(Determinism, LogitsIndependentOfThreadCount) {
  std::printf("seed %u\n", kSeed);
  const std::vector<int32_t> ids = random_tokens(512, 512, kSeed);
  const std::vector<float> expected = logits_with(1, stories(), ids);
  for (int threads : {2, 3}) {
    const std::vector<float> got = logits_with(threads, stories(), ids);
    ASSERT_EQ(got.size(), expected.size());
    int64_t differ = 0;
    for (size_t i = 0; i < got.size(); ++i) differ += got[i] != expected[i];
    EXPECT_EQ(differ, 0) << threads << " threads vs 1: " << differ << " of " << got.size() << " logits differ";
  }
}

}  // namespace
}  // namespace nibble
