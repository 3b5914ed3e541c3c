// The residual-stream rotation (quant/residual_rotation.h): the rotations are orthogonal and
// seeded; the rotated FP model computes the original logits (dense, GQA, Qwen2's biases and tied
// head, Mixtral's router and experts); the packed file carries it (the streamed `nibble quantize`
// path writes the in-memory path's bytes, the recipe field round-trips, older files read as none)
// and the refusals name it.
#include <cmath>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/core/json.h"
#include "nibble/core/progress.h"
#include "nibble/io/packed.h"
#include "nibble/model/model.h"
#include "nibble/quant/quantize_checkpoint.h"
#include "nibble/quant/quantize_model.h"
#include "nibble/quant/recipe.h"
#include "nibble/quant/residual_rotation.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using quant::ResidualRotation;
using test::logits_of;
using test::orthogonality_error;
using test::random_tokens;
using test::rel_max;

TEST(ResidualRotation, RotationsAreOrthogonalAndSeeded) {
  // Walsh-Hadamard (64), Paley 12 ⊗ Walsh 64 (nibble-ref's 768), Paley 20 ⊗ Walsh 8, Paley 44 ⊗ 2.
  for (int64_t n : {64, 768, 160, 88}) {
    SCOPED_TRACE(n);
    ASSERT_TRUE(quant::has_hadamard(n));
    const auto h = quant::residual_rotation_matrix(ResidualRotation::Hadamard, n, 7);
    EXPECT_LE(orthogonality_error(h, n), 1e-12);
    for (double v : h) ASSERT_NEAR(std::abs(v), 1 / std::sqrt(double(n)), 1e-15);  // a Hadamard: ±1/√n
    const auto g = quant::residual_rotation_matrix(ResidualRotation::Random, n, 7);
    EXPECT_LE(orthogonality_error(g, n), 1e-12);
    EXPECT_EQ(g, quant::residual_rotation_matrix(ResidualRotation::Random, n, 7));
    EXPECT_NE(g, quant::residual_rotation_matrix(ResidualRotation::Random, n, 8));
    EXPECT_EQ(h, quant::residual_rotation_matrix(ResidualRotation::Hadamard, n, 7));
    EXPECT_NE(h, quant::residual_rotation_matrix(ResidualRotation::Hadamard, n, 8));  // other signs
  }
  for (int64_t n : {6, 10, 18}) {  // no Paley or Walsh factorisation
    EXPECT_FALSE(quant::has_hadamard(n)) << n;
    EXPECT_THROW(quant::residual_rotation_matrix(ResidualRotation::Hadamard, n, 0), Error);
  }
}

// The rotated FP model (norms folded, embedding, every linear and the LM head rotated) computes the
// original logits up to the fp16 rounding of the rotated embedding and head; rotating the layers
// alone (the embedding left in the old basis) does not: the test can fail.
TEST(ResidualRotation, RotatedModelKeepsLogits) {
  for (const char* fixture : {"llama3-rope", "qwen2", "mixtral"}) {
    for (ResidualRotation kind : {ResidualRotation::Hadamard, ResidualRotation::Random}) {
      SCOPED_TRACE(fmt::format("{} {}", fixture, quant::residual_rotation_name(kind)));
      const fs::path dir = test::source_dir() / "tests/fixtures" / fixture;
      auto model = Model::load(dir);
      const ModelConfig c = model->config();
      const std::vector<int32_t> probe = random_tokens(40, 256, 21);
      const auto before = logits_of(*model, probe);
      const auto r = quant::residual_rotation_matrix(kind, c.hidden_size, 3);
      quant::rotate_model_residual(*model, r);
      EXPECT_LE(rel_max(logits_of(*model, probe), before), 3e-3);
      EXPECT_FALSE(model->config().tie_word_embeddings);
      for (const Layer& layer : model->layers()) {
        EXPECT_EQ(layer.attn_norm, std::vector<float>(size_t(c.hidden_size), 1.0f));
        EXPECT_EQ(layer.mlp_norm, std::vector<float>(size_t(c.hidden_size), 1.0f));
      }
      auto layers_only = Model::load(dir);
      for (Layer& layer : layers_only->layers()) quant::rotate_layer_residual(layer, r);
      EXPECT_GT(rel_max(logits_of(*layers_only, probe), before), 0.1);
    }
  }
}

// Without the fp16 rounding of the outer tensors the rotation is exact to float precision: the
// rotated model's logits against a float64 fold written out on layer 0's q/k/v product.
TEST(ResidualRotation, FoldedReaderIsWeightTimesNormTimesRotation) {
  auto model = Model::load(test::source_dir() / "tests/fixtures/llama3-rope");
  const ModelConfig& c = model->config();
  const int64_t n = c.hidden_size;
  Layer& layer = model->layers()[0];
  const std::vector<float> w = dynamic_cast<DenseLinear&>(*layer.qkv).weight(), g = layer.attn_norm;
  const std::vector<float> wo = dynamic_cast<DenseLinear&>(*layer.o).weight();
  const auto r = quant::residual_rotation_matrix(ResidualRotation::Random, n, 5);
  quant::rotate_layer_residual(layer, r);
  const auto& wr = dynamic_cast<DenseLinear&>(*layer.qkv).weight();
  const int64_t rows = int64_t(w.size()) / n;
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0;
      for (int64_t k = 0; k < n; ++k) ref += double(w[size_t(i * n + k)]) * g[size_t(k)] * r[size_t(k * n + j)];
      worst = std::max(worst, std::abs(ref - wr[size_t(i * n + j)]));
      scale = std::max(scale, std::abs(ref));
    }
  EXPECT_LE(worst, 1e-5 * scale);
  const auto& wor = dynamic_cast<DenseLinear&>(*layer.o).weight();  // o_proj := Rᵀ·W
  const int64_t cols = int64_t(wo.size()) / n;
  worst = scale = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double ref = 0;
      for (int64_t k = 0; k < n; ++k) ref += r[size_t(k * n + i)] * wo[size_t(k * cols + j)];
      worst = std::max(worst, std::abs(ref - wor[size_t(i * cols + j)]));
      scale = std::max(scale, std::abs(ref));
    }
  EXPECT_LE(worst, 1e-5 * scale);
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// stories260K (tied embeddings, hidden 64) with a small atom-w4a4 and --residual-rotation: the
// streamed `nibble quantize` file equals the in-memory path's byte for byte, it loads untied and
// gives the quantized model's logits bit for bit, and its FP part (fp16 recipe) gives the
// original's. The recipe field round-trips; older files and --atom-compat read as none.
TEST(ResidualRotation, PackedFileCarriesTheRotatedModel) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  Progress::set_quiet(true);
  const fs::path src = test::data_dir() / "models/stories260K";
  const fs::path dir = fs::temp_directory_path() / fmt::format("nibble_residual_rotation_{}", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  quant::Recipe r = quant::Recipe::preset("atom-w4a4");
  r.weight.group = r.act.group = 32;
  r.keeper = 8;
  r.calib_windows = 4;
  r.calib_ctx = 128;
  r.residual_rotation = ResidualRotation::Hadamard;
  quant::Recipe fp = quant::Recipe::preset("fp16");
  fp.residual_rotation = ResidualRotation::Random;
  const std::vector<int32_t> calib = random_tokens(4096, 512, 1), probe = random_tokens(64, 512, 2);
  auto original = Model::load(src);
  ASSERT_TRUE(original->config().tie_word_embeddings);
  const auto fp_logits = logits_of(*original, probe);
  for (const quant::Recipe& recipe : {r, fp}) {
    SCOPED_TRACE(recipe.describe());
    quant::CheckpointQuantizeOptions o;
    o.model = o.tokenizer = src;
    o.out = dir / "streamed.safetensors";
    o.calib_where = "calib";
    o.show_progress = false;
    const auto res = quant::quantize_checkpoint(recipe, calib, o);
    auto m = Model::load(src);
    const quant::QuantizeReport rep = quant::quantize_model(*m, recipe, calib, "calib", false);
    quant::Recipe used = recipe;
    if (rep.calib_ctx > 0) used.calib_ctx = rep.calib_ctx;
    save_packed_model(*m, used.to_json().dump(), src, dir / "in_memory.safetensors");
    EXPECT_TRUE(read_bytes(o.out) == read_bytes(dir / "in_memory.safetensors"))
        << "the streamed file differs from the in-memory path's";
    EXPECT_EQ(res.weight_bytes, m->storage_bytes());
    auto loaded = Model::load(o.out);
    EXPECT_FALSE(loaded->config().tie_word_embeddings);
    const auto logits = logits_of(*loaded, probe);
    EXPECT_EQ(logits, logits_of(*m, probe));
    if (!recipe.quantizes_anything()) {
      EXPECT_LE(rel_max(logits, fp_logits), 3e-3);
    }
    const auto recorded = quant::Recipe::from_json(parse_json(loaded->metadata().at("nibble.recipe"), "test"), "test");
    EXPECT_EQ(recorded.residual_rotation, recipe.residual_rotation);
  }
  fs::remove_all(dir);

  nlohmann::json older = r.to_json();
  older.erase("residual_rotation");
  EXPECT_EQ(quant::Recipe::from_json(older, "test").residual_rotation, ResidualRotation::None);
  quant::Recipe compat = r;
  compat.apply_atom_compat();
  EXPECT_EQ(compat.residual_rotation, ResidualRotation::None);
  // A hidden size without a Hadamard construction is refused by name (random still fits it).
  ModelConfig odd = original->config();
  odd.hidden_size = 18;
  try {
    fp.residual_rotation = ResidualRotation::Hadamard;
    fp.validate(odd);
    ADD_FAILURE() << "hadamard on 18 channels was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--residual-rotation random"), std::string::npos) << e.what();
  }
  fp.residual_rotation = ResidualRotation::Random;
  EXPECT_NO_THROW(fp.validate(odd));
}

}  // namespace
}  // namespace nibble
