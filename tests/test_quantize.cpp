// Model-level quantization: reordering is exact, the packed file reproduces the in-memory model
// bit for bit, recipes that do not fit a model are refused, the quantized KV cache is close.
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/core/interrupt.h"
#include "nibble/core/progress.h"
#include "nibble/eval/perplexity.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/io/text_file.h"
#include "nibble/model/model.h"
#include "nibble/quant/calibrate.h"
#include "nibble/quant/kv_quant.h"
#include "nibble/quant/loss_split.h"
#include "nibble/quant/quantize_checkpoint.h"
#include "nibble/quant/quantize_model.h"
#include "nibble/quant/smooth.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

using quant::Recipe;

using test::logits_of;
using test::random_tokens;
using test::rel_max;

// stories260K's scaled-down Atom recipe: K = 64 cannot take groups of 128 with 128 keepers.
Recipe small_atom() {
  Recipe r = Recipe::preset("atom-w4a4");
  r.weight.group = r.act.group = 32;
  r.keeper = 8;
  r.calib_windows = 8;
  r.calib_ctx = 128;
  return r;
}

class QuantizeStories : public ::testing::Test {
 protected:
  void SetUp() override {
    NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
    model = Model::load(test::data_dir() / "models/stories260K");
    calib = random_tokens(4096, 512, 1);
    probe = random_tokens(96, 512, 2);
  }
  std::unique_ptr<Model> model;
  std::vector<int32_t> calib, probe;
};

TEST_F(QuantizeStories, ReorderAloneKeepsLogits) {
  const std::vector<float> before = logits_of(*model, probe);
  Recipe r = Recipe::preset("fp16");
  r.reorder = true;
  r.calib_windows = 4;
  r.calib_ctx = 64;
  r.kv.bits = 32;
  quant::quantize_model(*model, r, calib, "calib", false);
  // Every linear now gathers its input and down_proj's order is folded into gate/up.
  EXPECT_FALSE(dynamic_cast<quant::QuantLinear&>(*model->layers()[0].qkv).perm().empty());
  EXPECT_LE(rel_max(logits_of(*model, probe), before), 1e-5);
}

TEST_F(QuantizeStories, PackedFileEqualsSimulatedModelBitForBit) {
  quant::quantize_model(*model, small_atom(), calib, "calib", false);
  const std::vector<float> simulated = logits_of(*model, probe);
  const auto path = std::filesystem::temp_directory_path() / "nibble_test_packed.safetensors";
  save_packed_model(*model, small_atom().to_json().dump(), test::data_dir() / "models/stories260K", path);
  auto loaded = Model::load(path);
  const std::vector<float> packed = logits_of(*loaded, probe);
  ASSERT_EQ(packed.size(), simulated.size());
  for (size_t i = 0; i < packed.size(); ++i) ASSERT_EQ(packed[i], simulated[i]) << "logit " << i;
  EXPECT_EQ(loaded->kv_format().bits, 4);
  std::filesystem::remove(path);
}

// Per-slot keeper counts reach each linear and travel in the packed file's recipe: the loaded
// model has the same counts and logits, bit for bit.
TEST_F(QuantizeStories, KeeperBySlotEqualsInPackedFile) {
  Recipe r = small_atom();
  r.weight.group = r.act.group = 8;  // so that every count below tiles K = 64 exactly
  r.keeper_by_slot = {16, 8, 0, 32};  // K = 64 (q/k/v, o, gate/up), 172 (down: 32 + 4 of remainder)
  quant::quantize_model(*model, r, calib, "calib", false);
  auto keeper_of = [](const Linear& l) { return dynamic_cast<const quant::QuantLinear&>(l).spec().keeper; };
  const Layer& layer = model->layers()[1];
  EXPECT_EQ(keeper_of(*layer.qkv), 16);
  EXPECT_EQ(keeper_of(*layer.o), 8);
  EXPECT_EQ(keeper_of(*layer.experts[0].gate_up), 0);
  EXPECT_EQ(keeper_of(*layer.experts[0].down), 36);
  const std::vector<float> simulated = logits_of(*model, probe);
  const auto path = std::filesystem::temp_directory_path() / "nibble_test_keeper_by_slot.safetensors";
  save_packed_model(*model, r.to_json().dump(), test::data_dir() / "models/stories260K", path);
  auto loaded = Model::load(path);
  EXPECT_EQ(keeper_of(*loaded->layers()[1].qkv), 16);
  EXPECT_EQ(keeper_of(*loaded->layers()[1].experts[0].down), keeper_of(*layer.experts[0].down));
  const std::vector<float> packed = logits_of(*loaded, probe);
  ASSERT_EQ(packed.size(), simulated.size());
  for (size_t i = 0; i < packed.size(); ++i) ASSERT_EQ(packed[i], simulated[i]) << "logit " << i;
  std::filesystem::remove(path);
  // Three counts are refused by name.
  r.keeper_by_slot = {8, 8, 8};
  EXPECT_THROW(r.validate(model->config()), Error);
}

// The smoothing folded into the norms (no longer bf16-exact) and weights travels in the packed file:
// the loaded model runs the quantized model's logits bit for bit.
TEST_F(QuantizeStories, SmoothedPackedFileEqualsSimulatedModel) {
  Recipe r = small_atom();
  r.smooth_alpha = 0.5;
  const std::vector<float> norm_before = model->layers()[0].attn_norm;
  quant::quantize_model(*model, r, calib, "calib", false);
  EXPECT_NE(model->layers()[0].attn_norm, norm_before);
  const std::vector<float> simulated = logits_of(*model, probe);
  const auto path = std::filesystem::temp_directory_path() / "nibble_test_smoothed.safetensors";
  save_packed_model(*model, r.to_json().dump(), test::data_dir() / "models/stories260K", path);
  auto loaded = Model::load(path);
  EXPECT_EQ(loaded->layers()[0].attn_norm, model->layers()[0].attn_norm);
  const std::vector<float> packed = logits_of(*loaded, probe);
  ASSERT_EQ(packed.size(), simulated.size());
  for (size_t i = 0; i < packed.size(); ++i) ASSERT_EQ(packed[i], simulated[i]) << "logit " << i;
  EXPECT_EQ(Recipe::from_json(r.to_json(), "test").smooth_alpha, 0.5);
  std::filesystem::remove(path);
}

// --w-clip-gptq-loss picks other weight clips than the diag(H) search (other logits), travels in the
// packed file's recipe (a file written before it, without the field, reads as off), needs the clip
// search, and is refused by name on the device, whose column loop scores clips by diag(H) only.
TEST_F(QuantizeStories, ClipByGptqLossTravelsInRecipeAndIsCpuOnly) {
  auto by_hdiag = Model::load(test::data_dir() / "models/stories260K");
  quant::quantize_model(*by_hdiag, small_atom(), calib, "calib", false);
  Recipe r = small_atom();
  r.clip_by_gptq_loss = true;
  quant::quantize_model(*model, r, calib, "calib", false);
  EXPECT_NE(logits_of(*model, probe), logits_of(*by_hdiag, probe));
  const std::vector<float> simulated = logits_of(*model, probe);
  const auto path = std::filesystem::temp_directory_path() / "nibble_test_clip_gptq_loss.safetensors";
  save_packed_model(*model, r.to_json().dump(), test::data_dir() / "models/stories260K", path);
  EXPECT_EQ(logits_of(*Model::load(path), probe), simulated);
  std::filesystem::remove(path);
  EXPECT_TRUE(Recipe::from_json(r.to_json(), "test").clip_by_gptq_loss);
  nlohmann::json older = r.to_json();
  older.erase("clip_by_gptq_loss");
  EXPECT_FALSE(Recipe::from_json(older, "test").clip_by_gptq_loss);
  quant::QuantizeReport report;
  auto fresh = Model::load(test::data_dir() / "models/stories260K");
  auto embed = [&](std::span<const int32_t> w, float* h) { fresh->embed(w, h); };
  EXPECT_THROW(quant::LayerQuantizer(*fresh, r, calib, "calib", embed, report, true), Error);
  r.clip_search = false;
  EXPECT_THROW(r.validate(model->config()), Error);
}

TEST_F(QuantizeStories, EveryPresetRunsOrIsRefused) {
  for (const std::string& name : Recipe::preset_names()) {
    auto m = Model::load(test::data_dir() / "models/stories260K");
    Recipe r = Recipe::preset(name);
    r.calib_windows = 4;
    r.calib_ctx = 64;
    if (name != "fp16" && name != "w8a8" && name != "w4a4-rtn") {
      // Groups of 128 cannot fit K = 64, groups of 16 or 32 not K = 172 without keepers, 256
      // keepers not K = 64: a clear error naming the group or the keepers and the channels.
      try {
        quant::quantize_model(*m, r, calib, "calib", false);
        FAIL() << name << " should be refused on stories260K";
      } catch (const Error& e) {
        const std::string msg = e.what();
        EXPECT_TRUE(msg.find("group size") != std::string::npos || msg.find("--keeper 128") != std::string::npos ||
                    msg.find("--keeper 256 must be below") != std::string::npos)
            << msg;
      }
      continue;
    }
    quant::quantize_model(*m, r, calib, "calib", false);
    for (float v : logits_of(*m, probe)) ASSERT_TRUE(std::isfinite(v)) << name;
  }
}

TEST_F(QuantizeStories, NonsenseRecipesAreRefused) {
  Recipe r = small_atom();
  r.keeper = 64;  // keeper >= K
  EXPECT_THROW(quant::quantize_model(*model, r, calib, "calib", false), Error);
  r = small_atom();
  r.keeper = 0;  // 32 does not divide down_proj's 172 channels, and no keepers hold the rest
  EXPECT_THROW(quant::quantize_model(*model, r, calib, "calib", false), Error);
  r = small_atom();
  r.weight.format = quant::Format::Mxfp4;  // MXFP4 needs group 32 and clip 1
  EXPECT_THROW(quant::quantize_model(*model, r, calib, "calib", false), Error);
  r = small_atom();
  r.smooth_alpha = 0.3;
  r.gptq = false;  // smoothing rescales the fused statistics pass's Hessians: RTN has none
  EXPECT_THROW(quant::quantize_model(*model, r, calib, "calib", false), Error);
  r = small_atom();
  r.k_smooth_alpha = 1.5;  // α outside [0, 1)
  EXPECT_THROW(quant::quantize_model(*model, r, calib, "calib", false), Error);
  r = small_atom();
  r.calib_ctx = 512;
  const std::vector<int32_t> too_short(100, 5);
  EXPECT_THROW(quant::quantize_model(*model, r, too_short, "calib", false), Error);
}

// The default window is min(2048, context); a longer one is honoured, with a warning, as Atom's code
// calibrates on 2048-token windows whatever the model's context.
TEST_F(QuantizeStories, CalibrationPastTheContextWarns) {
  const int64_t context = model->config().max_position_embeddings;
  Recipe r = small_atom();
  r.calib_windows = 2;
  r.calib_ctx = 0;
  EXPECT_EQ(quant::quantize_model(*model, r, calib, "calib", false).calib_ctx, std::min<int64_t>(2048, context));
  auto fresh = Model::load(test::data_dir() / "models/stories260K");
  r.calib_ctx = context + 64;
  const quant::QuantizeReport rep = quant::quantize_model(*fresh, r, calib, "calib", false);
  EXPECT_EQ(rep.calib_ctx, context + 64);
  ASSERT_EQ(rep.warnings.size(), 1u);
  EXPECT_NE(rep.warnings[0].find("past the model's context"), std::string::npos) << rep.warnings[0];
}

// The cache quantizing K and V the way format.h fake-quantizes a tensor: each token's head vector
// (Hadamard-rotated first when asked, and rotated back after) through fake_quantize_rows with the
// asymmetric INT format and the clip ratio, stored in fp32.
class FakeQuantKVCache final : public KVCache {
 public:
  FakeQuantKVCache(int64_t layers, int64_t kv_dim, int64_t head_dim, int64_t capacity, KVFormat f)
      : KVCache(layers, kv_dim, capacity), head_dim_(head_dim), f_(f),
        k_(size_t(layers), std::vector<float>(size_t(capacity * kv_dim))), v_(k_) {}
  std::unique_ptr<KVCache> clone() const override { return std::make_unique<FakeQuantKVCache>(*this); }
  void write(int layer, int64_t pos, int64_t n, const float* k, const float* v) override {
    store(k, pos, n, k_[size_t(layer)]);
    store(v, pos, n, v_[size_t(layer)]);
  }
  void read(int layer, int64_t n, float* k, float* v) const override {
    std::copy_n(k_[size_t(layer)].begin(), n * kv_dim_, k);
    std::copy_n(v_[size_t(layer)].begin(), n * kv_dim_, v);
  }
  int64_t bytes_per_token() const override { return 0; }

 private:
  void store(const float* x, int64_t pos, int64_t n, std::vector<float>& out) const {
    const quant::FormatSpec spec{f_.bits == 4 ? quant::Format::Int4Asym : quant::Format::Int8Asym, int(head_dim_), 1,
                                 f_.clip};
    for (int64_t i = 0; i < n * kv_dim_; i += head_dim_) {
      float* h = out.data() + pos * kv_dim_ + i;
      std::copy_n(x + i, head_dim_, h);
      if (f_.hadamard) quant::hadamard_transform(h, head_dim_);
      quant::fake_quantize_rows(h, 1, head_dim_, spec, "test KV");
      if (f_.hadamard) quant::hadamard_transform(h, head_dim_);
    }
  }
  int64_t head_dim_;
  KVFormat f_;
  std::vector<std::vector<float>> k_, v_;
};

// Logits of a prefill of `prompt` then one token at a time through `cache` (every append reaches
// the cached K/V of the earlier positions).
std::vector<float> prefill_then_decode(Model& m, KVCache& cache, const std::vector<int32_t>& prompt,
                                       const std::vector<int32_t>& more) {
  const Step s{&cache, prompt, true};
  std::vector<float> out = m.forward({&s, 1});
  for (int32_t t : more) {
    const int32_t one[1] = {t};
    const Step d{&cache, one, true};
    const std::vector<float> l = m.forward({&d, 1});
    out.insert(out.end(), l.begin(), l.end());
  }
  return out;
}

// The integer KV cache, clip and Hadamard included, K stored after or before RoPE: the model's
// logits equal, bit for bit, those of the same model over a cache holding format.h's
// fake-quantized K/V, over a prefill and later appends.
TEST_F(QuantizeStories, KVCacheEqualsFormatFakeQuantized) {
  const std::vector<int32_t> prompt(probe.begin(), probe.begin() + 64), more(probe.begin() + 64, probe.end());
  const ModelConfig& c = model->config();
  model->set_kv_format({32, false, 1.0f});
  auto fp_cache = model->new_cache(int64_t(probe.size()));
  const std::vector<float> fp = prefill_then_decode(*model, *fp_cache, prompt, more);
  for (const KVFormat& f : {KVFormat{8, false, 1.0f}, KVFormat{4, false, 0.9f, true}, KVFormat{4, true, 0.85f},
                            KVFormat{4, false, 0.7f}}) {
    SCOPED_TRACE(f.describe());
    model->set_kv_format(f);
    auto cache = model->new_cache(int64_t(probe.size()));
    const std::vector<float> got = prefill_then_decode(*model, *cache, prompt, more);
    FakeQuantKVCache ref_cache(c.num_layers, c.kv_dim(), c.head_dim, int64_t(probe.size()), f);
    const std::vector<float> want = prefill_then_decode(*model, ref_cache, prompt, more);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << "logit " << i;
    EXPECT_GT(rel_max(got, fp), 1e-4);  // really quantized
  }
}

// nibble split's pieces: a restored slot (weights and activations) computes the FP linear's
// product, and restored activations alone are the dequantized weight's product with the input
// gathered (and group-rotated) but not quantized.
TEST_F(QuantizeStories, LossSplitRestoresTheSlotItNames) {
  auto fp = Model::load(test::data_dir() / "models/stories260K");
  quant::quantize_model(*model, small_atom(), calib, "calib", false);
  const int64_t rows = 5;
  for (LinearSlot s : {LinearSlot::QKV, LinearSlot::O}) {
    SCOPED_TRACE(linear_slot_name(s));
    Linear& fp_lin = s == LinearSlot::QKV ? *fp->layers()[1].qkv : *fp->layers()[1].o;
    auto q_lin = [&]() -> quant::QuantLinear& {
      return dynamic_cast<quant::QuantLinear&>(s == LinearSlot::QKV ? *model->layers()[1].qkv : *model->layers()[1].o);
    };
    const int64_t K = fp_lin.in_features(), N = fp_lin.out_features();
    std::vector<float> x(size_t(rows * K));
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    for (float& v : x) v = nd(rng);
    std::vector<float> want(size_t(rows * N)), got(want.size());

    quant::restore_activations(*model, s);
    const quant::QuantLinear& qa = q_lin();
    EXPECT_FALSE(qa.spec().act.has_value());
    std::vector<float> xp(x.size());  // gathered and rotated by hand
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < K; ++c) xp[size_t(r * K + c)] = x[size_t(r * K + qa.perm()[size_t(c)])];
    quant::rotate_groups(xp.data(), rows, K, K - qa.spec().keeper, qa.spec().weight.group);
    const std::vector<float>& w = qa.dequantized();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (int64_t c = 0; c < K; ++c) acc += double(xp[size_t(r * K + c)]) * w[size_t(n * K + c)];
        want[size_t(r * N + n)] = float(acc);
      }
    qa.forward(x.data(), rows, got.data());
    EXPECT_LE(rel_max(got, want), 1e-5);

    quant::restore_weights(*model, *fp, s);
    fp_lin.forward(x.data(), rows, want.data());
    q_lin().forward(x.data(), rows, got.data());
    EXPECT_LE(rel_max(got, want), 1e-5);
  }
  // gate/up and down_proj carry a folded order the split cannot undo: refused by name.
  EXPECT_THROW(quant::restore_weights(*model, *fp, LinearSlot::Down), Error);
  // Every layer restored, with a full-precision cache: the FP model's logits.
  const std::vector<float> want = logits_of(*fp, probe);
  for (int l = 0; l < int(model->layers().size()); ++l) quant::restore_layer(*model, *fp, l);
  model->set_kv_format({32, false, 1.0f});
  EXPECT_LE(rel_max(logits_of(*model, probe), want), 1e-6);
}

// The mixed cache: K and V of each layer in their own format, each as that format's cache stores it.
TEST(LossSplit, MixedCacheKeepsEachLayersKAndVFormat) {
  ModelConfig c;
  c.num_layers = 3;
  c.num_heads = c.num_kv_heads = 2;
  c.head_dim = 16;
  c.hidden_size = 32;
  const KVFormat fp{32, false, 1.0f}, int4{4, false, 0.9f, true};
  // Layer 2 keeps K and V in one format (one cache): V must not overwrite K there.
  auto mixed = quant::make_mixed_kv_cache(c, {fp, int4, int4}, {int4, fp, int4}, 8);
  auto ref = make_kv_cache(3, c.kv_dim(), c.head_dim, 8, int4);
  const int64_t n = 8, d = c.kv_dim();
  std::vector<float> k(size_t(n * d)), v(k.size());
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  for (int l = 0; l < 3; ++l) {
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    mixed->write(l, 0, n, k.data(), v.data());
    ref->write(l, 0, n, k.data(), v.data());
    std::vector<float> mk(k.size()), mv(k.size()), rk(k.size()), rv(k.size());
    mixed->read(l, n, mk.data(), mv.data());
    ref->read(l, n, rk.data(), rv.data());
    EXPECT_EQ(mk, l == 0 ? k : rk) << "layer " << l;
    EXPECT_EQ(mv, l == 1 ? v : rv) << "layer " << l;
    EXPECT_NE(rk, k);  // int4 really rounds
  }
}

}  // namespace
}  // namespace nibble

namespace nibble {
namespace {

// ---- Quality against full precision -------------------------------------------------------------
// Consistency tests (packed = simulated) pass whatever the quantizer chooses; these bound what it
// achieves. A fixed recipe, calibration text and evaluation windows, all deterministic: the bounds
// sit a little above today's figures (the margin absorbs nothing but platform rounding), far below
// what a plausible bug gives (notes/mutants.md: keepers chosen as the least salient channels, GPTQ
// keepers from the uncompensated weights, ...).

struct Quality {
  double kld_mean, top1, ppl, fp_ppl;
};

// The first `max_chars` characters of a text, tokenized with BOS (tokenizing a whole
// 2 MB text would cost more than the test).
std::vector<int32_t> text_tokens(const std::string& model_dir, const std::string& text, size_t max_chars) {
  const Tokenizer tok = Tokenizer::load(test::data_dir() / model_dir);
  std::string s = read_text_file(test::data_dir() / "text" / text);
  if (s.size() > max_chars) s.resize(max_chars);
  return tok.encode(s, true);
}

Quality quantized_quality(const std::string& model_dir, const Recipe& recipe, const std::vector<int32_t>& calib,
                          const std::vector<int32_t>& eval, int64_t ctx, int64_t windows) {
  Progress::set_quiet(true);
  auto fp = Model::load(test::data_dir() / model_dir);
  auto q = Model::load(test::data_dir() / model_dir);
  const quant::QuantizeReport rep = quant::quantize_model(*q, recipe, calib, "calib", false);
  PerplexityOptions opt;
  opt.ctx = ctx;
  opt.max_windows = windows;
  opt.show_progress = false;
  const PerplexityResult r = perplexity(*q, eval, opt, fp.get());
  std::printf("%s: KLD mean %.5f, top-1 %.4f, ppl %.4f (FP %.4f) over %lld predictions; quantized in %.1f s, "
              "scored in %.1f s\n",
              model_dir.c_str(), r.kld_mean, r.top1, r.ppl, r.base_ppl, (long long)r.scored, rep.seconds, r.seconds);
  return {r.kld_mean, r.top1, r.ppl, r.base_ppl};
}

// stories260K, the scaled-down Atom recipe (group 32, 8 keepers), calibrated on the start of
// WikiText-2, evaluated on the TinyStories sample (3 windows of 512, 1533 predictions).
TEST(QuantizeQuality, Stories260KScaledAtomRecipe) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  NIBBLE_REQUIRE_DATA("text/wikitext2_test_gptq_join.txt");
  NIBBLE_REQUIRE_DATA("text/tinystories_valid_sample.txt");
  const auto calib = text_tokens("models/stories260K", "wikitext2_test_gptq_join.txt", 200000);
  const auto eval = text_tokens("models/stories260K", "tinystories_valid_sample.txt", 1u << 20);
  const Quality got = quantized_quality("models/stories260K", small_atom(), calib, eval, 512, 0);
  EXPECT_NEAR(std::log(got.fp_ppl), std::log(5.8493), 1e-4);  // REFERENCE.md, as test_perplexity
  // Today (1 to 3 threads; the thread count moves the calibration sums' last bits): KLD 0.8690-0.8696,
  // top-1 0.545-0.553, ppl 13.51-13.55. The bounds leave 3% (0.01 for top-1); the bugs of
  // notes/mutants.md that reach this recipe move them by 10-14% (top-1 by 0.02-0.03).
  EXPECT_LE(got.kld_mean, 0.895);
  EXPECT_GE(got.top1, 0.535);
  EXPECT_LE(got.ppl, 13.95);
}

// The Atom shape itself (groups of 128, 128 INT8 keepers), which only nibble-ref is wide enough
// for: atom-w4a4 with a short calibration (16 windows of 512 tokens of calib.txt), evaluated on
// the first 4 windows of 512 of heldout.txt (about a minute of CI's two cores).
TEST(QuantizeQuality, NibbleRefAtomW4A4) {
  NIBBLE_REQUIRE_DATA("models/nibble-ref/config.json");
  NIBBLE_REQUIRE_DATA("text/calib.txt");
  NIBBLE_REQUIRE_DATA("text/heldout.txt");
  Recipe r = Recipe::preset("atom-w4a4");
  r.calib_windows = 16;
  r.calib_ctx = 512;
  const auto calib = text_tokens("models/nibble-ref", "calib.txt", 400000);
  const auto eval = text_tokens("models/nibble-ref", "heldout.txt", 20000);
  ASSERT_GE(eval.size(), 4u * 512);
  const Quality got = quantized_quality("models/nibble-ref", r, calib, eval, 512, 4);
  std::printf("nibble-ref atom-w4a4: KLD %.4f, top-1 %.4f, ppl %.2f (FP %.4f)\n", got.kld_mean, got.top1, got.ppl,
              got.fp_ppl);
  // FP perplexity on these windows: a regression value of today's forward pass (which matches HF's
  // logits to 1e-4, test_model), to 1e-4 nats as the perplexity tests.
  EXPECT_NEAR(std::log(got.fp_ppl), std::log(31.4342), 1e-4);
  // Today: KLD 0.1505, top-1 0.8112, ppl 32.92 (thread-count independent; 0.1473, 0.7999, 32.05
  // with OpenBLAS's products before the batch-invariant gemm_nt). KLD and ppl may rise 1-3%;
  // top-1 over 2044 predictions has a binomial spread of 0.009, so it may fall two of those (0.018):
  // a legitimate change of rounding anywhere upstream moves it that much (this session's merges
  // moved it by 0.012 while KLD and ppl improved; the order of gemm_nt's final lane sum alone moved
  // KLD between 0.1505 and 0.1562). The uncompensated-keeper mutant gives KLD 0.1625. So the bounds
  // are today's values + 3% (KLD, ppl) and - 0.018 (top-1): a rounding change passes, the mutant
  // (+8% KLD) does not.
  EXPECT_LE(got.kld_mean, 0.1550);
  EXPECT_GE(got.top1, 0.793);
  EXPECT_LE(got.ppl, 33.91);
}

// GPTQ act-order in Atom's layout: the same keepers last (the top 3 ascending), the INT4 channels
// before them descending, by hand.
TEST(Reorder, ActOrderPutsTheInt4ChannelsMostSalientFirst) {
  const std::vector<double> metric = {3, 1, 4, 1.5, 5, 9, 2, 6, 5.5, 3.5};
  // Ascending: 1 3 6 0 9 2 4 8 | 7 5 ... with 3 keepers: channels 8 (5.5), 7 (6), 5 (9).
  EXPECT_EQ(quant::salience_order(metric, 3, true), (std::vector<int32_t>{4, 2, 9, 0, 6, 3, 1, 8, 7, 5}));
  EXPECT_EQ(quant::salience_order(metric, 3, false), (std::vector<int32_t>{1, 3, 6, 0, 9, 2, 4, 8, 7, 5}));
}

// Ascending and stable: equal channels keep their order, so the last `keeper` are the largest.
TEST(Reorder, SalienceOrderIsAscendingAndStable) {
  EXPECT_EQ(quant::salience_order({3, 1, 4, 1, 5, 9, 2, 6, 5, 3}), (std::vector<int32_t>{1, 3, 6, 0, 9, 2, 4, 8, 7, 5}));
  const uint32_t seed = 21;
  std::mt19937 rng(seed);
  std::vector<double> metric(300);
  for (auto& m : metric) m = double(rng() % 100);  // many ties
  const std::vector<int32_t> order = quant::salience_order(metric);
  std::vector<int32_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) ASSERT_EQ(sorted[i], int32_t(i)) << "not a permutation (seed " << seed << ")";
  for (size_t i = 1; i < order.size(); ++i) {
    const double a = metric[size_t(order[i - 1])], b = metric[size_t(order[i])];
    ASSERT_TRUE(a < b || (a == b && order[i - 1] < order[i])) << "position " << i << " (seed " << seed << ")";
  }
  // The tail of k is the top k by the metric: nothing left in the head is larger than the tail's least.
  for (size_t k : {1, 8, 64, 128}) {
    double head_max = -1, tail_min = 1e9;
    for (size_t i = 0; i < order.size() - k; ++i) head_max = std::max(head_max, metric[size_t(order[i])]);
    for (size_t i = order.size() - k; i < order.size(); ++i) tail_min = std::min(tail_min, metric[size_t(order[i])]);
    EXPECT_LE(head_max, tail_min) << "k " << k;
  }
}

// The reorder metrics (Σx², Σ|x| per channel) and XᵀX, accumulated over several adds, against a
// float64 loop. XᵀX goes through fp32 BLAS per add: each entry is a sum of `rows` products of
// values up to 3, rounded at most ~rows times at 2^-24 relative: 1e-5 of the largest entry.
TEST(Calibration, InputStatsMatchAFloat64Loop) {
  const uint32_t seed = 24;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const int64_t K = 24, rows = 30;
  quant::InputStats st(K, true);
  std::vector<double> sq(static_cast<size_t>(K)), ab(static_cast<size_t>(K)), xtx(size_t(K * K));
  for (int add = 0; add < 3; ++add) {
    std::vector<float> x(size_t(rows * K));
    for (int64_t i = 0; i < rows * K; ++i) x[size_t(i)] = nd(rng) * (i % K == 5 ? 3.0f : 1.0f) + (i % K == 7 ? 2.0f : 0.0f);
    st.add(x.data(), rows);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < K; ++i) {
        const double v = x[size_t(r * K + i)];
        sq[size_t(i)] += v * v;
        ab[size_t(i)] += std::abs(v);
        for (int64_t j = 0; j < K; ++j) xtx[size_t(i * K + j)] += v * x[size_t(r * K + j)];
      }
  }
  EXPECT_EQ(st.count(), 3 * rows);
  for (int64_t i = 0; i < K; ++i) {
    EXPECT_NEAR(st.sum_sq()[size_t(i)], sq[size_t(i)], 1e-9 * sq[size_t(i)]) << "channel " << i << " (seed " << seed << ")";
    EXPECT_NEAR(st.sum_abs()[size_t(i)], ab[size_t(i)], 1e-9 * ab[size_t(i)]) << "channel " << i;
  }
  double xmax = 0;
  for (double v : xtx) xmax = std::max(xmax, std::abs(v));
  const std::vector<double> got = st.xtx();
  for (int64_t i = 0; i < K * K; ++i) ASSERT_NEAR(got[size_t(i)], xtx[size_t(i)], 1e-5 * xmax) << "entry " << i;
}

// XᵀX of the gathered inputs X[:, order], summed in float64 here, is the permuted Hessian.
TEST(Reorder, PermutedHessianIsTheGatheredInputsHessian) {
  const uint32_t seed = 22;
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  const int64_t T = 50, K = 40;
  std::vector<double> X(size_t(T * K));
  for (auto& x : X) x = nd(rng);
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  auto xtx = [&](auto col) {
    std::vector<double> H(size_t(K * K), 0.0);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j)
        for (int64_t t = 0; t < T; ++t) H[size_t(i * K + j)] += X[size_t(t * K + col(i))] * X[size_t(t * K + col(j))];
    return H;
  };
  const std::vector<double> H = xtx([](int64_t i) { return i; });
  const std::vector<double> gathered = xtx([&](int64_t i) { return int64_t(order[size_t(i)]); });
  // The same products in the same order; only the compiler's FMA contraction may differ.
  const std::vector<double> got = quant::permute_hessian(H, order);
  for (int64_t i = 0; i < K * K; ++i)
    ASSERT_NEAR(got[size_t(i)], gathered[size_t(i)], 1e-12 * T) << "entry " << i << " (seed " << seed << ")";
  EXPECT_EQ(quant::permute_hessian(H, {}), H);
}

// R·H·R with R written out as a matrix in float64 (the Sylvester Hadamard H_ij = (-1)^popcount(i&j) / √G
// on each group of the main channels, the identity on the keepers). rotate_hessian_groups works in
// float: each entry carries ~2 log2(G) float roundings of values up to max|H|, so 1e-5 · max|H|.
TEST(Reorder, RotatedHessianIsRHR) {
  const uint32_t seed = 23;
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  const int64_t K = 96, main = 64, G = 32, T = 200;
  std::vector<double> H(size_t(K * K), 0.0), x(static_cast<size_t>(K));
  for (int64_t t = 0; t < T; ++t) {
    for (auto& v : x) v = nd(rng) * (1 + 3 * (rng() % 5 == 0));
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) H[size_t(i * K + j)] += x[size_t(i)] * x[size_t(j)];
  }
  std::vector<double> R(size_t(K * K), 0.0);
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) {
      if (i >= main || j >= main) R[size_t(i * K + j)] = i == j;
      else if (i / G == j / G)
        R[size_t(i * K + j)] = (__builtin_popcountll(uint64_t((i % G) & (j % G))) % 2 ? -1.0 : 1.0) / std::sqrt(double(G));
    }
  auto mul = [&](const std::vector<double>& A, const std::vector<double>& B) {
    std::vector<double> C(size_t(K * K), 0.0);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < K; ++j) C[size_t(i * K + j)] += A[size_t(i * K + k)] * B[size_t(k * K + j)];
    return C;
  };
  const std::vector<double> want = mul(mul(R, H), R);
  std::vector<double> got = H;
  quant::rotate_hessian_groups(got, K, main, G);
  double hmax = 0;
  for (double h : H) hmax = std::max(hmax, std::abs(h));
  for (int64_t i = 0; i < K * K; ++i) ASSERT_NEAR(got[size_t(i)], want[size_t(i)], 1e-5 * hmax) << "entry " << i << " (seed " << seed << ")";
}

TEST(KVQuant, HadamardIsOrthonormalAndSelfInverse) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(128), y;
  for (auto& v : x) v = nd(rng);
  y = x;
  quant::hadamard_transform(y.data(), 128);
  double nx = 0, ny = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    nx += double(x[i]) * x[i];
    ny += double(y[i]) * y[i];
  }
  EXPECT_NEAR(ny / nx, 1.0, 1e-5);
  // The first output is the scaled sum: an independent check of the butterfly.
  double sum = 0;
  for (float v : x) sum += v;
  EXPECT_NEAR(y[0], sum / std::sqrt(128.0), 1e-4);
  quant::hadamard_transform(y.data(), 128);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
}

// A channel outlier in K ruins a plain INT4 group; the rotated cache spreads it out.
TEST(KVQuant, HadamardShrinksErrorOnOutlierChannels) {
  std::mt19937 rng(4);
  std::normal_distribution<float> nd;
  const int64_t d = 128, n = 64;
  std::vector<float> k(size_t(n * d)), v(size_t(n * d));
  for (auto& x : k) x = nd(rng);
  for (int64_t t = 0; t < n; ++t) k[size_t(t * d + 7)] = 40.0f;  // an outlier channel
  v = k;
  double err[2];
  for (int h = 0; h < 2; ++h) {
    auto cache = make_kv_cache(1, d, d, n, KVFormat{4, false, 1.0f, h == 1});
    cache->write(0, 0, n, k.data(), v.data());
    std::vector<float> K(k.size()), V(v.size());
    cache->read(0, n, K.data(), V.data());
    err[h] = 0;
    for (size_t i = 0; i < k.size(); ++i)
      if (i % size_t(d) != 7) err[h] += (K[i] - k[i]) * (K[i] - k[i]);
  }
  EXPECT_LT(err[1], 0.5 * err[0]) << "plain " << err[0] << " rotated " << err[1];
}

}  // namespace
}  // namespace nibble

namespace nibble {
namespace {

// Mixtral experts are quantized from the tokens routed to each; Qwen2's q/k/v biases stay
// (fp16) and are added after the product. The packed file must still equal the simulated model.
class QuantizeFixture : public ::testing::TestWithParam<const char*> {};

// Atom's recipe scaled to the fixtures (hidden 64): groups of 16, 16 keepers, 8 windows of 64.
Recipe fixture_atom() {
  Recipe r = Recipe::preset("atom-w4a4");
  r.weight.group = r.act.group = 16;
  r.keeper = 16;
  r.calib_windows = 8;
  r.calib_ctx = 64;
  return r;
}

TEST_P(QuantizeFixture, PackedEqualsSimulated) {
  const auto dir = test::source_dir() / "tests/fixtures" / GetParam();
  auto model = Model::load(dir);
  Recipe r = fixture_atom();
  const std::vector<int32_t> calib = random_tokens(2048, 256, 5), probe = random_tokens(40, 256, 6);
  const auto fp = logits_of(*model, probe);
  const quant::QuantizeReport rep = quant::quantize_model(*model, r, calib, "calib", false);
  const auto sim = logits_of(*model, probe);
  EXPECT_GT(rel_max(sim, fp), 1e-4);  // really quantized (random tiny weights: no accuracy claim)
  for (float v : sim) ASSERT_TRUE(std::isfinite(v));
  if (model->config().num_experts) {
    auto& layer = model->layers()[0];
    EXPECT_NE(dynamic_cast<quant::QuantLinear*>(layer.experts[1].gate_up.get()), nullptr);
    EXPECT_NE(dynamic_cast<DenseLinear*>(layer.router.get()), nullptr);  // the router stays full precision
  }
  if (model->config().attention_bias) {
    EXPECT_FALSE(dynamic_cast<quant::QuantLinear&>(*model->layers()[0].qkv).bias().empty());
  }
  const auto path = std::filesystem::temp_directory_path() / (std::string("nibble_fx_") + GetParam() + ".safetensors");
  save_packed_model(*model, r.to_json().dump(), dir, path);
  const auto packed = logits_of(*Model::load(path), probe);
  for (size_t i = 0; i < sim.size(); ++i) ASSERT_EQ(packed[i], sim[i]) << i;
  std::filesystem::remove(path);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, QuantizeFixture, ::testing::Values("mixtral", "qwen2", "llama3-rope"));

// atom-w4a4's clip ratios (activations 0.8 in the rotated basis, KV 0.9) are nibble's, chosen on
// calib.txt; --atom-compat gives back Atom's paper values along with its other choices.
TEST(Recipe, AtomCompatRestoresAtomsChoices) {
  Recipe r = Recipe::preset("atom-w4a4");
  EXPECT_FLOAT_EQ(r.act.clip, 0.8f);
  EXPECT_FLOAT_EQ(r.kv.clip, 0.9f);
  EXPECT_TRUE(r.group_hadamard && r.clip_search && r.kv.hadamard && !r.kv.k_before_rope && !r.fp16_activations);
  r.smooth_alpha = 0.3;
  r.k_smooth_alpha = 0.5;
  r.clip_by_gptq_loss = true;
  r.apply_atom_compat();
  EXPECT_EQ(r.smooth_alpha, 0.0);  // Atom has no smoothing: the ladder stays Atom's
  EXPECT_EQ(r.k_smooth_alpha, 0.0);
  EXPECT_FLOAT_EQ(r.act.clip, 0.9f);
  EXPECT_FLOAT_EQ(r.weight.clip, 0.85f);
  EXPECT_FLOAT_EQ(r.kv.clip, 1.0f);
  EXPECT_FALSE(r.group_hadamard || r.clip_search || r.clip_by_gptq_loss || r.kv.hadamard);
  EXPECT_TRUE(r.kv.k_before_rope && r.fp16_activations && r.hessian_from_quantized_inputs);
  EXPECT_EQ(r.weight.format, quant::Format::Int4SymAtomGptq);
  // The ladder's steps keep their own clip ratios (1.0 before step 5).
  Recipe rtn = Recipe::preset("w4a4-rtn");
  rtn.apply_atom_compat();
  EXPECT_FLOAT_EQ(rtn.act.clip, 1.0f);
}

// --atom-compat runs the model with fp16 activations, from calibration on; the packed file says so
// and the loaded model runs the same way, bit for bit.
TEST(PackedFile, AtomCompatKeepsFp16Activations) {
  const auto dir = test::source_dir() / "tests/fixtures/llama3-rope";
  auto model = Model::load(dir);
  Recipe r = fixture_atom();
  r.apply_atom_compat();
  ASSERT_TRUE(r.fp16_activations);
  const std::vector<int32_t> calib = random_tokens(2048, 256, 5), probe = random_tokens(40, 256, 6);
  quant::quantize_model(*model, r, calib, "calib", false);
  EXPECT_TRUE(model->fp16_activations());
  const auto sim = logits_of(*model, probe);
  const auto path = std::filesystem::temp_directory_path() / "nibble_atom_compat.safetensors";
  save_packed_model(*model, r.to_json().dump(), dir, path);
  auto loaded = Model::load(path);
  EXPECT_TRUE(loaded->fp16_activations());
  const auto packed = logits_of(*loaded, probe);
  for (size_t i = 0; i < sim.size(); ++i) ASSERT_EQ(packed[i], sim[i]) << i;
  loaded->set_fp16_activations(false);
  EXPECT_GT(rel_max(logits_of(*loaded, probe), sim), 1e-5);  // the mode really changes the numbers
  std::filesystem::remove(path);
}

// A packed file whose tensors disagree with its recipe/config, or that is not a nibble file.
TEST(PackedFile, TamperedFilesAreRefused) {
  const auto dir = test::source_dir() / "tests/fixtures/mistral";
  auto model = Model::load(dir);
  Recipe r = Recipe::preset("w4a4-rtn");
  quant::quantize_model(*model, r, {}, "calib", false);
  const auto path = std::filesystem::temp_directory_path() / "nibble_tamper.safetensors";
  save_packed_model(*model, r.to_json().dump(), dir, path);
  // Rewrite it with one tensor's shape changed, keeping the metadata.
  const auto f = SafetensorsFile::open(path);
  SafetensorsWriter w;
  for (const auto& [k, v] : f->metadata()) w.set_metadata(k, v);
  for (const auto& [name, t] : f->tensors()) {
    auto shape = t.shape;
    if (name == "model.layers.1.self_attn.o_proj.codes") std::swap(shape[0], shape[1]);
    w.add(name, t.dtype, shape, std::span<const uint8_t>(t.data, t.nbytes));
  }
  const auto bad = std::filesystem::temp_directory_path() / "nibble_tamper_bad.safetensors";
  w.write(bad);
  try {
    Model::load(bad);
    FAIL() << "a wrong shape must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("o_proj.codes"), std::string::npos) << e.what();
  }
  // A recipe the config cannot take.
  SafetensorsWriter w2;
  for (const auto& [k, v] : f->metadata()) w2.set_metadata(k, v);
  auto recipe = nlohmann::json::parse(f->metadata().at("nibble.recipe"));
  recipe["weight"]["group"] = 48;
  w2.set_metadata("nibble.recipe", recipe.dump());
  for (const auto& [name, t] : f->tensors()) w2.add(name, t.dtype, t.shape, std::span<const uint8_t>(t.data, t.nbytes));
  w2.write(bad);
  EXPECT_THROW(Model::load(bad), Error);
  // A plain safetensors file given where a model is expected.
  EXPECT_THROW(load_packed_model(test::source_dir() / "tests/fixtures/mistral/reference.safetensors"), Error);
  std::filesystem::remove(path);
  std::filesystem::remove(bad);
}

}  // namespace
}  // namespace nibble

namespace nibble {
namespace {

// Rotating each group of both operands by the same orthonormal Hadamard leaves the product exact:
// with nothing quantized, a group-rotated model computes the original logits.
TEST(GroupHadamard, RotationAloneKeepsLogits) {
  const auto dir = test::source_dir() / "tests/fixtures/llama3-rope";
  auto model = Model::load(dir);
  const std::vector<int32_t> probe = random_tokens(40, 256, 8);
  const auto before = logits_of(*model, probe);
  auto& layer = model->layers()[1];
  auto& d = dynamic_cast<DenseLinear&>(*layer.experts[0].down);
  quant::LinearQuantSpec spec;
  spec.weight.group = 32;
  spec.group_hadamard = true;
  std::vector<float> w = d.weight();
  quant::rotate_groups(w.data(), d.out_features(), d.in_features(), d.in_features(), 32);
  layer.experts[0].down = quant::QuantLinear::activation_only(spec, d.out_features(), d.in_features(), {}, w, {});
  EXPECT_LE(rel_max(logits_of(*model, probe), before), 1e-5);
}

// SmoothQuant's migration folded into norms, up rows and weight columns: with nothing quantized
// the folded model computes the unfolded model's logits (float rounding only).
TEST(Smoothing, FoldedLayerKeepsLogits) {
  const uint32_t seed = 31;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ud(0.25, 4.0);
  auto model = Model::load(test::source_dir() / "tests/fixtures/llama3-rope");
  const std::vector<int32_t> probe = random_tokens(40, 256, 9);
  const auto before = logits_of(*model, probe);
  const std::vector<float> norm_before = model->layers()[0].attn_norm;
  const ModelConfig& c = model->config();
  for (auto& layer : model->layers())
    for (LinearSlot slot : {LinearSlot::QKV, LinearSlot::GateUp, LinearSlot::Down}) {
      std::vector<double> s(size_t(slot == LinearSlot::Down ? c.intermediate_size : c.hidden_size));
      for (double& v : s) v = ud(rng);
      quant::fold_input_scales(layer, slot, s, c.intermediate_size);
    }
  const auto after = logits_of(*model, probe);
  EXPECT_LE(rel_max(after, before), 1e-5) << "seed " << seed;
  EXPECT_NE(model->layers()[0].attn_norm, norm_before);  // really folded
}

// The scales against the formula written out: s_c ∝ rms_c^α / max|W[:, c]|^(1-α) with geometric
// mean 1 over the smoothed channels, and 1 on the keepers (the channels of largest Σx²).
TEST(Smoothing, ScalesFollowTheFormulaAndSpareTheKeepers) {
  const uint32_t seed = 32;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ud(0.1, 10.0);
  const int64_t N = 6, K = 20, keeper = 4, count = 50;
  const double alpha = 0.4;
  std::vector<double> sum_sq(static_cast<size_t>(K));
  for (auto& v : sum_sq) v = ud(rng) * count;
  std::vector<float> w(size_t(N * K));
  for (auto& v : w) v = float(ud(rng) - 5);
  const std::vector<double> s = quant::smoothing_scales(sum_sq, count, w, N, K, alpha, keeper);
  std::vector<double> sorted = sum_sq;
  std::sort(sorted.begin(), sorted.end());
  const double keeper_threshold = sorted[size_t(K - keeper)];
  std::vector<double> raw;
  double log_sum = 0;
  for (int64_t c = 0; c < K; ++c) {
    if (sum_sq[size_t(c)] >= keeper_threshold) continue;
    double wmax = 0;
    for (int64_t n = 0; n < N; ++n) wmax = std::max(wmax, std::abs(double(w[size_t(n * K + c)])));
    raw.push_back(std::pow(sum_sq[size_t(c)] / count, alpha / 2) / std::pow(wmax, 1 - alpha));
    log_sum += std::log(raw.back());
  }
  ASSERT_EQ(int64_t(raw.size()), K - keeper);
  const double gmean = std::exp(log_sum / double(raw.size()));
  size_t i = 0;
  for (int64_t c = 0; c < K; ++c) {
    if (sum_sq[size_t(c)] >= keeper_threshold) EXPECT_EQ(s[size_t(c)], 1.0) << "keeper " << c;
    else {
      const double expected = raw[i++] / gmean;
      EXPECT_NEAR(s[size_t(c)], expected, 1e-12 * expected) << "channel " << c << " (seed " << seed << ")";
    }
  }
}

// SmoothAttention folded into the q and k rows: with λ shared by the channel pairs RoPE rotates
// together, q·k and so the logits are unchanged; a λ that splits a pair changes them (the test
// can tell). GQA: the fixture has 4 query heads on 2 KV heads.
TEST(Smoothing, KeyScalesKeepLogitsOnlyWhenRopePairsShareThem) {
  const uint32_t seed = 34;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ud(0.25, 4.0);
  const auto dir = test::source_dir() / "tests/fixtures/llama3-rope";
  auto model = Model::load(dir);
  const ModelConfig& c = model->config();
  ASSERT_LT(c.num_kv_heads, c.num_heads);
  const std::vector<int32_t> probe = random_tokens(40, 256, 10);
  const auto before = logits_of(*model, probe);
  const int64_t hd = c.head_dim;
  std::vector<double> paired(size_t(c.kv_dim())), split(size_t(c.kv_dim()));
  for (int64_t r = 0; r < c.kv_dim(); ++r) {
    paired[size_t(r)] = r % hd < hd / 2 ? ud(rng) : paired[size_t(r - hd / 2)];
    split[size_t(r)] = ud(rng);
  }
  for (auto& layer : model->layers()) quant::fold_key_scales(layer, c, paired);
  EXPECT_LE(rel_max(logits_of(*model, probe), before), 1e-5) << "seed " << seed;
  auto other = Model::load(dir);
  for (auto& layer : other->layers()) quant::fold_key_scales(layer, c, split);
  EXPECT_GT(rel_max(logits_of(*other, probe), before), 1e-3) << "seed " << seed;
}

// λ from XᵀX against K computed row by row in float64 (k = W_k·x), paired and normalised by hand.
TEST(Smoothing, KeyScalesMatchTheKeysOfAFloat64Pass) {
  const uint32_t seed = 35;
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  ModelConfig c;
  c.hidden_size = 12;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 6;
  const int64_t H = c.hidden_size, T = 64, rows = c.q_dim() + 2 * c.kv_dim(), hd = c.head_dim;
  const double alpha = 0.5;
  std::vector<double> X(size_t(T * H)), xtx(size_t(H * H), 0.0);
  for (int64_t i = 0; i < T * H; ++i) X[size_t(i)] = nd(rng) * (i % H == 3 ? 5 : 1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < H; ++j) xtx[size_t(i * H + j)] += X[size_t(t * H + i)] * X[size_t(t * H + j)];
  std::vector<float> w(size_t(rows * H));
  for (auto& v : w) v = float(nd(rng));
  const std::vector<double> got = quant::key_smoothing_scales(xtx, T, w, c, alpha);
  std::vector<double> ms(size_t(c.kv_dim()), 0.0);
  for (int64_t r = 0; r < c.kv_dim(); ++r) {
    for (int64_t t = 0; t < T; ++t) {
      double k = 0;
      for (int64_t i = 0; i < H; ++i) k += double(w[size_t((c.q_dim() + r) * H + i)]) * X[size_t(t * H + i)];
      ms[size_t(r)] += k * k / T;
    }
  }
  for (int64_t g = 0; g < c.num_kv_heads; ++g) {
    std::vector<double> want(static_cast<size_t>(hd));
    double log_sum = 0;
    for (int64_t i = 0; i < hd; ++i) {
      const int64_t p = i < hd / 2 ? i : i - hd / 2;
      want[size_t(i)] = std::pow((ms[size_t(g * hd + p)] + ms[size_t(g * hd + p + hd / 2)]) / 2, alpha / 2);
      log_sum += std::log(want[size_t(i)]);
    }
    for (int64_t i = 0; i < hd; ++i) {
      const double expect = want[size_t(i)] / std::exp(log_sum / double(hd));
      EXPECT_NEAR(got[size_t(g * hd + i)], expect, 1e-9 * expect) << "head " << g << " channel " << i << " (seed " << seed << ")";
    }
  }
}

// Rescaled statistics equal the statistics of the rescaled inputs (one more float64 pass).
TEST(Calibration, ScaledStatsAreTheScaledInputsStats) {
  const uint32_t seed = 33;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<double> ud(-3.0, 3.0);
  const int64_t K = 16, rows = 40;
  std::vector<float> x(size_t(rows * K));
  for (auto& v : x) v = nd(rng);
  std::vector<double> d(static_cast<size_t>(K));
  for (auto& v : d) v = ud(rng);
  std::vector<float> xd(x.size());
  for (int64_t i = 0; i < rows * K; ++i) xd[size_t(i)] = float(x[size_t(i)] * d[size_t(i % K)]);
  quant::InputStats scaled(K, true), direct(K, true);
  scaled.add(x.data(), rows);
  scaled.scale_channels(d);
  direct.add(xd.data(), rows);
  for (int64_t c = 0; c < K; ++c) {
    EXPECT_NEAR(scaled.sum_sq()[size_t(c)], direct.sum_sq()[size_t(c)], 1e-6 * direct.sum_sq()[size_t(c)]) << "seed " << seed;
    EXPECT_NEAR(scaled.sum_abs()[size_t(c)], direct.sum_abs()[size_t(c)], 1e-6 * direct.sum_abs()[size_t(c)]);
  }
  const auto a = scaled.xtx(), b = direct.xtx();
  double bmax = 0;
  for (double v : b) bmax = std::max(bmax, std::abs(v));
  for (int64_t i = 0; i < K * K; ++i) ASSERT_NEAR(a[size_t(i)], b[size_t(i)], 1e-5 * bmax) << "entry " << i;
}

// `nibble quantize` layer by layer (quant/quantize_checkpoint.h): the streamed file equals, byte
// for byte, the one written from the model quantized in memory (the reference path); an
// interrupted run leaves nothing under the output's name and resumes to the same bytes; a shard
// truncated mid-run is named; the expected size is close and a run that cannot fit is refused.
namespace fs = std::filesystem;

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
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
  // A rotated residual stream, with the full-precision stream that a resume replays (rotated too).
  Recipe rotated = small_atom();
  rotated.residual_rotation = quant::ResidualRotation::Hadamard;
  rotated.hessian_from_quantized_inputs = true;
  for (const Recipe& r : {small_atom(), compat, rotated}) {
    SCOPED_TRACE(r.describe());
    auto opt = options(stories(), "q.safetensors");
    auto interrupted = [&] {
      request_interrupt();
      try {
        quant::quantize_checkpoint(r, calib, opt);
      } catch (const Error& e) {
        return std::string(e.what());
      }
      ADD_FAILURE() << "an interrupted run finished";
      return std::string();
    };
    // A signal before layer 0: nothing under the output's name, and nothing left to resume.
    const std::string first = interrupted();
    EXPECT_NE(first.find("interrupted"), std::string::npos) << first;
    EXPECT_FALSE(fs::exists(opt.out));
    EXPECT_FALSE(fs::exists(quant::partial_dir(opt.out)));
    // Two layers (as a crash after layer 1 would leave them), then a signal while resuming.
    opt.stop_after_layers = 2;
    auto part = quant::quantize_checkpoint(r, calib, opt);
    EXPECT_EQ(part.bytes, 0);
    EXPECT_EQ(part.layers_done, 2);
    opt.stop_after_layers = 0;
    opt.resume = true;
    const std::string second = interrupted();
    EXPECT_NE(second.find("run again with --resume"), std::string::npos) << second;
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

// Elements idx of x quantized as one Int4Asym group in float64 (but for the fp16 rounding of the
// scale): range over the group and 0, clip, zero = round(-clip·min / scale), codes clamped to 0..15.
void int4_asym_reference(std::vector<double>& x, const std::vector<size_t>& idx, double clip) {
  double lo = 0, hi = 0;
  for (size_t i : idx) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]);
  const double scale = double(round_fp16(float(clip * (hi - lo) / 15)));
  const double zero = std::min(std::nearbyint(-clip * lo / scale), 15.0);
  for (size_t i : idx) x[i] = (std::clamp(std::nearbyint(x[i] / scale) + zero, 0.0, 15.0) - zero) * scale;
}

// KIVI-style K blocks: each complete block is, channel by channel (or head by head for per-token
// groups), a float64 Int4Asym quantization of the block (range over the block and 0, clip, fp16
// scale, zero = round(-clip·min / scale), codes clamped to 0..15); the residual after the last
// flushed block is K rounded to fp16, exactly; without the residual every block present is
// quantized; V is the packed format's own cache.
TEST(KVQuant, BlockKeyCacheQuantizesEachBlockLikeAFloat64Reference) {
  const int64_t head_dim = 16, heads = 2, d = head_dim * heads, block = 16, n = 40;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n * d)), v(k.size());
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < d; ++i) {
      // Channels with their own offset and spread (what per-channel scales are for).
      k[size_t(t * d + i)] = float(i % 5) - 1.5f + (1 + float(i % 3)) * nd(rng);
      v[size_t(t * d + i)] = nd(rng);
    }
  const float clip = 0.9f;
  auto reference = [&](bool per_channel, int64_t quantized) {
    std::vector<double> x(k.begin(), k.end());
    for (int64_t start = 0; start < quantized; start += block) {
      const int64_t t = std::min(block, quantized - start);
      for (int64_t g = 0; g < (per_channel ? d : t * heads); ++g) {
        std::vector<size_t> idx;
        for (int64_t i = 0; i < (per_channel ? t : head_dim); ++i)
          idx.push_back(size_t(per_channel ? (start + i) * d + g : start * d + g * head_dim + i));
        int4_asym_reference(x, idx, clip);
      }
    }
    for (size_t i = size_t(quantized * d); i < x.size(); ++i) x[i] = double(round_fp16(k[i]));
    return x;
  };
  const KVFormat packed{4, false, clip, true};
  auto values = make_kv_cache(1, d, head_dim, n, packed);
  values->write(0, 0, n, v.data(), v.data());
  std::vector<float> unused(k.size()), want_v(v.size());
  values->read(0, n, unused.data(), want_v.data());
  for (const quant::BlockKeyFormat f : {quant::BlockKeyFormat{block, true, true, false},
                                        quant::BlockKeyFormat{block, false, true, false},
                                        quant::BlockKeyFormat{block, true, false, false}}) {
    SCOPED_TRACE(f.describe());
    // As a chunked prefill (16, 16, then 8 tokens) and as a decode (a token at a time). With the
    // residual, a block is flushed when a write starts past it: [0, 32) is quantized, [32, 40)
    // stays fp16, either way.
    for (const int64_t piece : {16, 1}) {
      auto cache = quant::make_block_key_kv_cache(1, d, head_dim, n, packed, f);
      for (int64_t pos = 0; pos < n; pos += piece)
        cache->write(0, pos, std::min(piece, n - pos), k.data() + pos * d, v.data() + pos * d);
      std::vector<float> got_k(k.size(), std::nanf("")), got_v(v.size(), std::nanf(""));
      cache->read(0, n, got_k.data(), got_v.data());
      const std::vector<double> want = reference(f.per_channel, f.residual ? 32 : n);
      for (size_t i = 0; i < k.size(); ++i) ASSERT_NEAR(got_k[i], want[i], 1e-6) << "element " << i << ", pieces of " << piece;
      for (size_t i = size_t(32 * d); f.residual && i < k.size(); ++i) ASSERT_EQ(got_k[i], round_fp16(k[i]));
      EXPECT_EQ(got_v, want_v);
      double err = 0;
      for (size_t i = 0; i < size_t(32 * d); ++i) err += std::abs(got_k[i] - k[i]);
      EXPECT_GT(err, 1e-2);  // really quantized
    }
  }
}

// With the Hadamard rotation, the quantized blocks are the reference's in the rotated basis of
// each head vector (rotation and its inverse in float64 here).
TEST(KVQuant, BlockKeyCacheRotatesEachHeadBeforeItsChannels) {
  const int64_t head_dim = 8, d = head_dim, block = 8, n = 8;
  std::mt19937 rng(12);
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n * d)), v(k.size(), 0.0f);
  for (float& x : k) x = 2 * nd(rng);
  auto cache = quant::make_block_key_kv_cache(1, d, head_dim, n, KVFormat{4, false, 1.0f}, {block, true, false, true});
  cache->write(0, 0, n, k.data(), v.data());
  std::vector<float> got(k.size()), unused(k.size());
  cache->read(0, n, got.data(), unused.data());
  // Sylvester's Hadamard matrix of order 8, H[i][j] = (-1)^popcount(i & j) / sqrt(8).
  auto rotate = [&](std::vector<double>& x) {
    for (int64_t t = 0; t < n; ++t) {
      std::vector<double> y(size_t(d), 0.0);
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < d; ++j)
          y[size_t(i)] += (std::popcount(uint32_t(i & j)) % 2 ? -1.0 : 1.0) * x[size_t(t * d + j)] / std::sqrt(8.0);
      std::copy(y.begin(), y.end(), x.begin() + t * d);
    }
  };
  std::vector<double> x(k.begin(), k.end());
  rotate(x);
  for (int64_t c = 0; c < d; ++c) {  // each rotated channel over the block's 8 tokens
    std::vector<size_t> idx;
    for (int64_t t = 0; t < n; ++t) idx.push_back(size_t(t * d + c));
    int4_asym_reference(x, idx, 1.0);
  }
  rotate(x);
  for (size_t i = 0; i < k.size(); ++i) ASSERT_NEAR(got[i], x[i], 1e-5) << "element " << i;
}

}  // namespace
}  // namespace nibble
