// Learned KV-cache rotations (quant/kv_rotation.h): the straight-through gradient against finite
// differences, orthogonality and the loss of the learned R, the V fold and the run-time K rotation
// against float64 references, and the packed file / CUDA refusal of a K rotation.
#include <cmath>
#include <filesystem>
#include <random>

#include <gtest/gtest.h>

#include "nibble/backend/backend.h"
#include "nibble/core/error.h"
#include "nibble/io/packed.h"
#include "nibble/model/model.h"
#include "nibble/quant/hadamard.h"
#include "nibble/quant/kv_quant.h"
#include "nibble/quant/kv_rotation.h"
#include "nibble/quant/quantize_model.h"
#include "nibble/quant/recipe.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using quant::RotationProblem;

using test::logits_of;
using test::orthogonality_error;
using test::random_tokens;
using test::rel_max;

// A random orthogonal d × d matrix: Gram-Schmidt of Gaussian rows, in float64.
std::vector<double> random_orthogonal(int64_t d, std::mt19937& rng) {
  std::normal_distribution<double> nd;
  std::vector<double> q(size_t(d * d));
  for (auto& v : q) v = nd(rng);
  for (int64_t i = 0; i < d; ++i) {
    double* r = q.data() + i * d;
    for (int64_t j = 0; j < i; ++j) {
      const double* p = q.data() + j * d;
      double dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += r[k] * p[k];
      for (int64_t k = 0; k < d; ++k) r[k] -= dot * p[k];
    }
    double norm = 0;
    for (int64_t k = 0; k < d; ++k) norm += r[k] * r[k];
    for (int64_t k = 0; k < d; ++k) r[k] /= std::sqrt(norm);
  }
  return q;
}

// Head vectors with a few strong channels (what the Hadamard spreads and a learned R can do better
// on), a random positive semi-definite metric, the cache's INT4 quantizer.
RotationProblem outlier_problem(int64_t d, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  RotationProblem p;
  p.dim = d;
  p.spec = quant::kv_format_spec(KVFormat{4, false, 0.9f, true}, d);
  std::vector<double> scale(static_cast<size_t>(d));
  for (int64_t i = 0; i < d; ++i) scale[size_t(i)] = i % 7 == 0 ? 6.0 : 0.3 + 0.05 * double(i % 5);
  for (auto* x : {&p.train, &p.heldout})
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < d; ++i) x->push_back(float(nd(rng) * scale[size_t(i)] + (i == 3 ? 2.0 : 0.0)));
  std::vector<double> a(size_t(d * d));
  for (auto& v : a) v = nd(rng);
  p.metric.assign(size_t(d * d), 0.0);
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j)
      for (int64_t k = 0; k < d; ++k) p.metric[size_t(i * d + j)] += a[size_t(i * d + k)] * a[size_t(j * d + k)] / double(d);
  return p;
}

// The straight-through gradient is the exact gradient of the frozen surrogate: central finite
// differences along random directions, and the surrogate equals the real loss at its own point.
TEST(KVRotation, GradientMatchesFiniteDifferences) {
  const uint32_t seed = 41;
  const int64_t d = 16;
  const RotationProblem p = outlier_problem(d, 64, seed);
  std::mt19937 rng(seed);
  const std::vector<double> r0 = random_orthogonal(d, rng);
  const quant::FrozenQuantizer frozen = quant::freeze_quantizer(p, p.train, r0);
  std::vector<double> grad;
  const double at = quant::surrogate_loss(p, p.train, frozen, r0, &grad);
  EXPECT_NEAR(at, quant::rotation_loss(p, p.train, r0), 1e-6 * at);
  std::normal_distribution<double> nd;
  const double eps = 1e-5;
  for (int trial = 0; trial < 6; ++trial) {
    std::vector<double> dir(size_t(d * d)), plus = r0, minus = r0;
    double analytic = 0;
    for (size_t k = 0; k < dir.size(); ++k) {
      dir[k] = nd(rng);
      plus[k] += eps * dir[k];
      minus[k] -= eps * dir[k];
      analytic += grad[k] * dir[k];
    }
    const double numeric =
        (quant::surrogate_loss(p, p.train, frozen, plus, nullptr) - quant::surrogate_loss(p, p.train, frozen, minus, nullptr)) /
        (2 * eps);
    EXPECT_NEAR(analytic, numeric, 1e-6 * std::max(1.0, std::abs(numeric))) << "direction " << trial << " (seed " << seed << ")";
  }
  // A wrong gradient would be caught: dropping the quantizer path's term changes it.
  EXPECT_GT(std::abs(grad[0]) + std::abs(grad[1]), 0.0);
}

// Learning from R = I keeps R orthogonal, never ends above the Hadamard's training loss, and on
// vectors with strong channels finds a real gain; the held-out loss is reported.
TEST(KVRotation, LearnedRotationIsOrthogonalAndBeatsTheHadamardOnTraining) {
  const uint32_t seed = 42;
  const int64_t d = 32;
  const RotationProblem p = outlier_problem(d, 512, seed);
  const quant::LearnedRotation r = quant::learn_rotation(p);
  EXPECT_LE(orthogonality_error(r.rotation, d), 1e-6);
  EXPECT_LT(r.train_learned, 0.97 * r.train_hadamard) << "seed " << seed;
  std::vector<double> id(size_t(d * d), 0.0);
  for (int64_t i = 0; i < d; ++i) id[size_t(i * d + i)] = 1;
  EXPECT_NEAR(r.train_hadamard, quant::rotation_loss(p, p.train, id), 1e-12 * r.train_hadamard);
  EXPECT_NEAR(r.train_learned, quant::rotation_loss(p, p.train, r.rotation), 1e-9 * r.train_learned);
  std::printf("train %.6g -> %.6g, held out %.6g -> %.6g\n", r.train_hadamard, r.train_learned, r.heldout_hadamard,
              r.heldout_learned);
}

// V's rotation folded into v rows and o_proj columns: with nothing quantized the logits are the
// unfolded model's (float rounding only). GQA: 4 query heads on 2 KV heads.
TEST(KVRotation, ValueFoldKeepsLogits) {
  const uint32_t seed = 43;
  std::mt19937 rng(seed);
  auto model = Model::load(test::source_dir() / "tests/fixtures/llama3-rope");
  const ModelConfig& c = model->config();
  ASSERT_LT(c.num_kv_heads, c.num_heads);
  const std::vector<int32_t> probe = random_tokens(40, 256, 11);
  const auto before = logits_of(*model, probe);
  const std::vector<float> o_before = dynamic_cast<DenseLinear&>(*model->layers()[0].o).weight();
  for (auto& layer : model->layers()) {
    std::vector<double> rotations;
    for (int64_t g = 0; g < c.num_kv_heads; ++g) {
      const std::vector<double> r = random_orthogonal(c.head_dim, rng);
      rotations.insert(rotations.end(), r.begin(), r.end());
    }
    quant::fold_value_rotation(layer, c, rotations);
  }
  EXPECT_LE(rel_max(logits_of(*model, probe), before), 1e-5) << "seed " << seed;
  EXPECT_NE(dynamic_cast<DenseLinear&>(*model->layers()[0].o).weight(), o_before);  // really folded
}

// The run-time K rotation: with an fp32 cache q·k, and so the logits, are unchanged; with the INT4
// Hadamard cache layer 0's attention output is a float64 loop's over the cache's codes of R·k,
// with R·q, and differs from the unrotated cache's (the rotation reaches the quantizer).
TEST(KVRotation, KeyRotationMatchesFloat64Attention) {
  const uint32_t seed = 44;
  std::mt19937 rng(seed);
  auto model = Model::load(test::source_dir() / "tests/fixtures/llama3-rope");
  const ModelConfig& c = model->config();
  const int64_t d = c.head_dim, kvh = c.num_kv_heads, per_group = c.num_heads / kvh, qd = c.q_dim(), kvd = c.kv_dim();
  const std::vector<int32_t> probe = random_tokens(24, 256, 12);
  model->set_kv_format(KVFormat{32, false, 1.0f});
  const auto fp_before = logits_of(*model, probe);
  std::vector<double> rotation;
  for (int64_t g = 0; g < kvh; ++g) {
    const std::vector<double> r = random_orthogonal(d, rng);
    rotation.insert(rotation.end(), r.begin(), r.end());
  }
  for (double& x : rotation) x = double(float(x));  // the model holds R in fp32: the reference uses the same values
  for (auto& layer : model->layers()) layer.k_rotation.assign(rotation.begin(), rotation.end());
  EXPECT_LE(rel_max(logits_of(*model, probe), fp_before), 1e-5);

  const KVFormat int4{4, false, 0.9f, true};
  model->set_kv_format(int4);
  std::vector<float> q, k, v, attn;
  model->set_attention_observer([&](int l, const float* qr, const float* kr, const float* vr, int64_t rows) {
    if (l != 0) return;
    q.assign(qr, qr + rows * qd);
    k.assign(kr, kr + rows * kvd);
    v.assign(vr, vr + rows * kvd);
  });
  model->set_observer([&](int l, LinearSlot s, int, const float* x, int64_t rows) {
    if (l == 0 && s == LinearSlot::O) attn.assign(x, x + rows * qd);
  });
  logits_of(*model, probe);
  model->set_attention_observer(nullptr);
  model->set_observer(nullptr);
  const auto n = int64_t(probe.size());
  ASSERT_EQ(int64_t(k.size()), n * kvd);
  // The reference: each head vector as the cache stores it (float R·k, the Hadamard, INT4 codes)
  // read back in the rotated basis; logits (R·q)·k̂ / sqrt(d) causal, softmax, V̂, in float64.
  const quant::FormatSpec spec = quant::kv_format_spec(int4, d);
  auto cached = [&](std::vector<float> x, bool rotate) {
    std::vector<double> out(x.size());
    std::vector<float> head(static_cast<size_t>(d));
    std::vector<uint8_t> codes(static_cast<size_t>(d));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t g = 0; g < kvh; ++g) {
        const float* src = x.data() + t * kvd + g * d;
        for (int64_t i = 0; i < d; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < d; ++j) acc += (rotate ? rotation[size_t(g * d * d + i * d + j)] : i == j) * double(src[j]);
          head[size_t(i)] = float(acc);
        }
        quant::hadamard_transform(head.data(), d);
        const quant::GroupScale s = quant::encode_group(spec, head.data(), d, codes.data());
        quant::decode_group(spec.format, codes.data(), d, s, head.data());
        quant::hadamard_transform(head.data(), d);
        for (int64_t i = 0; i < d; ++i) out[size_t(t * kvd + g * d + i)] = head[size_t(i)];
      }
    return out;
  };
  const std::vector<double> K = cached(k, true), V = cached(v, false);
  double worst = 0, scale = 0, moved = 0;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < c.num_heads; ++h) {
      const int64_t g = h / per_group;
      std::vector<double> rq(static_cast<size_t>(d), 0.0), logit(size_t(t + 1));
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j) rq[size_t(i)] += rotation[size_t(g * d * d + i * d + j)] * q[size_t(t * qd + h * d + j)];
      double top = -1e300, sum = 0;
      for (int64_t s = 0; s <= t; ++s) {
        double dot = 0;
        for (int64_t i = 0; i < d; ++i) dot += rq[size_t(i)] * K[size_t(s * kvd + g * d + i)];
        logit[size_t(s)] = dot / std::sqrt(double(d));
        top = std::max(top, logit[size_t(s)]);
      }
      for (double& l : logit) sum += (l = std::exp(l - top));
      for (int64_t i = 0; i < d; ++i) {
        double o = 0;
        for (int64_t s = 0; s <= t; ++s) o += logit[size_t(s)] / sum * V[size_t(s * kvd + g * d + i)];
        const double got = attn[size_t(t * qd + h * d + i)];
        worst = std::max(worst, std::abs(got - o));
        scale = std::max(scale, std::abs(o));
      }
    }
  EXPECT_LE(worst, 1e-5 * scale) << "seed " << seed;
  // Without the rotation the same cache gives another output.
  for (auto& layer : model->layers()) layer.k_rotation.clear();
  model->set_observer([&](int l, LinearSlot s, int, const float* x, int64_t rows) {
    if (l == 0 && s == LinearSlot::O)
      for (int64_t i = 0; i < rows * qd; ++i) moved = std::max(moved, std::abs(double(x[i]) - attn[size_t(i)]));
  });
  logits_of(*model, probe);
  model->set_observer(nullptr);
  EXPECT_GT(moved, 1e-3 * scale);
}

// --kv-rotation learned on a small Atom recipe: V folded (o_proj changed), K rotations orthogonal in
// every layer, the packed file runs the in-memory model's logits bit for bit, the recipe travels
// (older files read as hadamard), atom-compat turns it off, and the CUDA path refuses the file by
// name on the host before any device is touched.
TEST(KVRotation, PackedFileCarriesKeyRotationAndCudaRefusesIt) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  const auto dir = test::data_dir() / "models/stories260K";
  auto model = Model::load(dir);
  quant::Recipe r = quant::Recipe::preset("atom-w4a4");
  r.weight.group = r.act.group = 32;
  r.keeper = 8;
  r.calib_windows = 4;
  r.calib_ctx = 128;
  r.kv_rotation = quant::KVRotation::Learned;
  ASSERT_EQ(r.kv.bits, 4);
  ASSERT_TRUE(r.kv.hadamard);
  const std::vector<int32_t> calib = random_tokens(4096, 512, 1), probe = random_tokens(64, 512, 2);
  const quant::QuantizeReport report = quant::quantize_model(*model, r, calib, "calib", false);
  const ModelConfig& c = model->config();
  EXPECT_EQ(int64_t(report.kv_rotation_losses.size()), 2 * c.num_layers * c.num_kv_heads);
  for (const Layer& layer : model->layers()) {
    ASSERT_EQ(int64_t(layer.k_rotation.size()), c.num_kv_heads * c.head_dim * c.head_dim);
    for (int64_t g = 0; g < c.num_kv_heads; ++g) {
      const auto* p = layer.k_rotation.data() + g * c.head_dim * c.head_dim;
      EXPECT_LE(orthogonality_error(std::vector<double>(p, p + c.head_dim * c.head_dim), c.head_dim), 1e-6);
    }
  }
  const std::vector<float> simulated = logits_of(*model, probe);
  const auto path = std::filesystem::temp_directory_path() / "nibble_test_kv_rotation.safetensors";
  save_packed_model(*model, r.to_json().dump(), dir, path);
  auto loaded = Model::load(path);
  EXPECT_EQ(logits_of(*loaded, probe), simulated);
  EXPECT_EQ(loaded->layers()[1].k_rotation, model->layers()[1].k_rotation);
  std::filesystem::remove(path);

  EXPECT_EQ(quant::Recipe::from_json(r.to_json(), "test").kv_rotation, quant::KVRotation::Learned);
  nlohmann::json older = r.to_json();
  older.erase("kv_rotation");
  EXPECT_EQ(quant::Recipe::from_json(older, "test").kv_rotation, quant::KVRotation::Hadamard);
  quant::Recipe compat = r;
  compat.apply_atom_compat();
  EXPECT_EQ(compat.kv_rotation, quant::KVRotation::Hadamard);
  quant::Recipe before_rope = r;
  before_rope.kv.k_before_rope = true;
  EXPECT_THROW(before_rope.validate(c), Error);
  before_rope.kv_rotation = quant::KVRotation::LearnedV;  // V's rotation does not care where K is rotated
  EXPECT_NO_THROW(before_rope.validate(c));

  try {
    check_cuda_layer_support(loaded->layers()[0], 0);
    ADD_FAILURE() << "a learned K rotation was not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--kv-rotation learned-k"), std::string::npos) << e.what();
  }
  RuntimeOptions opt;
  opt.device = "cuda";
  try {
    make_executor(*loaded, opt);
    ADD_FAILURE() << "the CUDA executor took a learned K rotation";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--kv-rotation learned-k"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nibble
