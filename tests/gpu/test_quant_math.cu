// `nibble quantize --device cuda`'s arithmetic (quant/device_math.h) against the CPU reference:
//  - the statistics (Σx², Σ|x| in float64; XᵀX as fp32 SSYRK per add, summed in float64) against
//    a float64 loop, to the bound the CPU's own test uses (1e-5 of the largest entry for XᵀX);
//  - the inverse-Hessian factor by cuSOLVER against LAPACK's (1e-9 relative);
//  - GPTQ on the device (factor, column loop, lazy updates) against the CPU's, for every recipe
//    and format: codes and scales equal except where the factor's and the DGEMMs' last bits move a
//    value across a rounding boundary; those are counted and printed; a second run is bit-identical;
//  - a whole quantization of stories260K (streamed, --device cuda against cpu) for atom-w4a4,
//    --atom-compat and w4a16-g128-gptq: identical up to the first layer where the device's XᵀX
//    moves a value across a rounding tie, few codes there, printed per layer. Its head_dim (8) has no attention
//    kernel, so its calibration passes stay on the CPU (said in a warning): only the arithmetic
//    above differs there;
//  - the calibration stream (LayerStream: one decoder layer over windows resident on the device)
//    against Model::run_layer on a random Llama-shaped model: the full-precision pass's hidden
//    states and statistics within fp16's rounding of the linear inputs, the quantized (W4A4) pass
//    within the CPU's own sensitivity to fp16 activations; and a whole --device cuda quantization
//    of a random checkpoint whose passes ran on the device, as accurate as the CPU path's.
// Seeds are fresh on every run and printed.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>

#include "gpu_test_util.h"
#include "random_model.h"
#include "nibble/backend/backend.h"
#include "nibble/core/error.h"
#include "nibble/core/progress.h"
#include "nibble/io/packed.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "nibble/quant/calibrate.h"
#include "nibble/quant/device_math.h"
#include "nibble/quant/gptq.h"
#include "nibble/quant/quantize_checkpoint.h"
#include "nibble/quant/quantize_model.h"
#include "nibble/quant/recipe.h"
#include "nibble/quant/synth.h"

namespace nibble::quant {
namespace {

using nibble::testing::fresh_seed;

// x [rows, dim]: normal values, a few outlier channels (what salience sorting is for).
std::vector<float> random_inputs(std::mt19937_64& rng, int64_t rows, int64_t dim) {
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(rows * dim));
  for (int64_t i = 0; i < rows * dim; ++i) x[size_t(i)] = nd(rng) * (i % dim % 37 == 5 ? 20.0f : 1.0f);
  return x;
}

TEST(QuantMath, StatisticsMatchAFloat64Loop) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t dim = 300;
  InputStats dev(dim, true, /*on_device=*/true), cpu(dim, true);
  std::vector<double> sq(static_cast<size_t>(dim)), ab(static_cast<size_t>(dim)), xtx(static_cast<size_t>(dim * dim));
  for (int64_t rows : {1, 257, 1024}) {
    const std::vector<float> x = random_inputs(rng, rows, dim);
    dev.add(x.data(), rows);
    cpu.add(x.data(), rows);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < dim; ++i) {
        const double v = x[size_t(r * dim + i)];
        sq[size_t(i)] += v * v;
        ab[size_t(i)] += std::abs(v);
        for (int64_t j = 0; j < dim; ++j) xtx[size_t(i * dim + j)] += v * x[size_t(r * dim + j)];
      }
  }
  EXPECT_EQ(dev.count(), 1 + 257 + 1024);
  for (int64_t i = 0; i < dim; ++i) {
    ASSERT_NEAR(dev.sum_sq()[size_t(i)], sq[size_t(i)], 1e-12 * sq[size_t(i)]) << "channel " << i << " seed " << seed;
    ASSERT_NEAR(dev.sum_abs()[size_t(i)], ab[size_t(i)], 1e-12 * ab[size_t(i)]) << "channel " << i;
  }
  double xmax = 0;
  for (double v : xtx) xmax = std::max(xmax, std::abs(v));
  const std::vector<double> got = dev.xtx(), ref_cpu = cpu.xtx();
  double worst = 0, worst_cpu = 0;
  for (int64_t i = 0; i < dim * dim; ++i) {
    worst = std::max(worst, std::abs(got[size_t(i)] - xtx[size_t(i)]) / xmax);
    worst_cpu = std::max(worst_cpu, std::abs(ref_cpu[size_t(i)] - xtx[size_t(i)]) / xmax);
  }
  std::printf("XtX, largest error / largest entry: device %.2e, CPU %.2e (float64 loop as truth)\n", worst, worst_cpu);
  EXPECT_LE(worst, 1e-5) << "seed " << seed;
}

TEST(QuantMath, InverseHessianFactorMatchesLapack) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t K = 384, rows = 2048;
  InputStats st(K, true);
  const std::vector<float> x = random_inputs(rng, rows, K);
  st.add(x.data(), rows);
  std::vector<char> dead_cpu, dead_dev;
  const std::vector<double> cpu = gptq_inverse_hessian_factor(st.xtx(), K, 0.01, &dead_cpu, "cpu");
  const std::vector<double> dev = gptq_inverse_hessian_factor(st.xtx(), K, 0.01, &dead_dev, "cuda", true);
  EXPECT_EQ(dead_cpu, dead_dev);
  double umax = 0, diff = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    umax = std::max(umax, std::abs(cpu[i]));
    diff = std::max(diff, std::abs(cpu[i] - dev[i]));
  }
  std::printf("inverse-Hessian factor: largest difference %.2e of largest entry %.2e\n", diff, umax);
  EXPECT_LE(diff, 1e-9 * umax) << "seed " << seed;
}

int64_t differing(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

int64_t differing_floats(const std::vector<float>& a, const std::vector<float>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i]);
  return n;
}

// One linear's GPTQ problem: a recipe's spec, W [N, K] and the Hessian of random inputs with
// outlier channels and one dead channel (never fires: its weights are zeroed).
struct GptqCase {
  const char* name;
  LinearQuantSpec spec;
  bool clip_search;
  int64_t block = 128;
};

std::vector<GptqCase> gptq_cases() {
  auto from_recipe = [](const char* preset, bool atom_compat) {
    Recipe r = Recipe::preset(preset);
    if (atom_compat) r.apply_atom_compat();
    r.group_hadamard = false;  // a rotation of W and H outside GPTQ: nothing to test here
    return std::pair{r.linear_spec(640, "test"), r.clip_search};
  };
  std::vector<GptqCase> cases;
  for (auto [name, preset, compat] : {std::tuple{"atom-w4a4", "atom-w4a4", false},
                                      std::tuple{"atom-w4a4 --atom-compat", "atom-w4a4", true},
                                      std::tuple{"w4a16-g128-gptq", "w4a16-g128-gptq", false}}) {
    auto [spec, clip] = from_recipe(preset, compat);
    cases.push_back({name, spec, clip});
  }
  // The other formats and keeper precisions, groups spanning several batches, whole-row groups.
  LinearQuantSpec s;
  s.weight = {Format::Int4Asym, 64, 1, 1.0f};
  s.keeper = 64;
  s.keeper_precision = KeeperPrecision::Fp16;
  cases.push_back({"int4-asym g64, fp16 keepers, batches of 32", s, true, 32});
  s.weight = {Format::Fp4E2M1, 32, 2, 1.0f};
  s.keeper_precision = KeeperPrecision::Fp8E4M3;
  cases.push_back({"fp4-e2m1 g32 row pairs, fp8-e4m3 keepers", s, true});
  s.weight = {Format::Mxfp4, 32, 1, 1.0f};
  s.keeper_precision = KeeperPrecision::Fp8E5M2;
  cases.push_back({"mxfp4, fp8-e5m2 keepers", s, false});
  s.weight = {Format::Nvfp4, 16, 1, 1.0f};
  s.keeper = 0;
  cases.push_back({"nvfp4", s, false});
  s.weight = {Format::Int8Sym, 0, 1, 1.0f};
  cases.push_back({"int8 whole rows, batches of 100", s, true, 100});
  return cases;
}

// The device's column loop against the host's: with the same Hessian the only differences are the
// factor's (cuSOLVER vs LAPACK) and the lazy updates' (cuBLAS vs OpenBLAS DGEMM) last bits, so
// codes and scales differ only where those move a value across a rounding boundary (a tie to
// ~1e-13); counted, printed, bounded at 1 in 1000. The device run again gives the same bits.
TEST(QuantMath, GptqOnTheDeviceMatchesTheCpuButForTies) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  const int64_t N = 256, K = 640, rows = 4096;
  std::vector<float> x = random_inputs(rng, rows, K);
  for (int64_t r = 0; r < rows; ++r) x[size_t(r * K + 3)] = 0;  // a dead channel
  InputStats st(K, true);
  st.add(x.data(), rows);
  std::normal_distribution<float> nd;
  std::vector<float> W(size_t(N * K));
  for (float& w : W) w = nd(rng) * 0.02f;
  std::printf("seed %llu\n", (unsigned long long)seed);
  for (const GptqCase& c : gptq_cases()) {
    SCOPED_TRACE(c.name);
    GptqOptions opt;
    opt.clip_search = c.clip_search;
    opt.block = c.block;
    const GptqResult cpu = gptq_quantize(W, N, K, st.xtx(), c.spec, opt, "cpu");
    opt.on_device = true;
    const GptqResult dev = gptq_quantize(W, N, K, st.xtx(), c.spec, opt, "cuda");
    const GptqResult again = gptq_quantize(W, N, K, st.xtx(), c.spec, opt, "cuda");
    ASSERT_EQ(cpu.main.codes.size(), dev.main.codes.size());
    ASSERT_EQ(cpu.main.scales.size(), dev.main.scales.size());
    ASSERT_EQ(cpu.keepers.has_value(), dev.keepers.has_value());
    ASSERT_EQ(cpu.keeper_fp16.size(), dev.keeper_fp16.size());
    const int64_t codes = differing(cpu.main.codes, dev.main.codes), scales = differing_floats(cpu.main.scales, dev.main.scales),
                  zeros = differing(cpu.main.zeros, dev.main.zeros);
    int64_t keeper_codes = 0, keeper_scales = 0, keeper_fp16 = 0;
    if (cpu.keepers) {
      keeper_codes = differing(cpu.keepers->codes, dev.keepers->codes);
      keeper_scales = differing_floats(cpu.keepers->scales, dev.keepers->scales);
    }
    for (size_t i = 0; i < cpu.keeper_fp16.size(); ++i) keeper_fp16 += cpu.keeper_fp16[i] != dev.keeper_fp16[i];
    std::printf("%-44s differing: codes %lld of %zu, scales %lld of %zu, zeros %lld, keeper codes %lld, keeper scales "
                "%lld, fp16 keepers %lld; loss %.9g vs %.9g\n",
                c.name, (long long)codes, cpu.main.codes.size(), (long long)scales, cpu.main.scales.size(),
                (long long)zeros, (long long)keeper_codes, (long long)keeper_scales, (long long)keeper_fp16, cpu.loss,
                dev.loss);
    const int64_t bound = int64_t(cpu.main.codes.size()) / 1000;
    EXPECT_LE(codes, bound) << "seed " << seed;
    EXPECT_LE(scales + zeros, std::max<int64_t>(1, int64_t(cpu.main.scales.size()) / 1000)) << "seed " << seed;
    EXPECT_LE(keeper_codes + keeper_scales + keeper_fp16, bound) << "seed " << seed;
    EXPECT_NEAR(dev.loss, cpu.loss, 1e-6 * cpu.loss) << "seed " << seed;
    // Deterministic: the same bits on a second run.
    EXPECT_EQ(again.main.codes, dev.main.codes);
    EXPECT_EQ(differing_floats(again.main.scales, dev.main.scales), 0);
    EXPECT_EQ(again.main.zeros, dev.main.zeros);
    if (dev.keepers) {
      EXPECT_EQ(again.keepers->codes, dev.keepers->codes);
      EXPECT_EQ(differing_floats(again.keepers->scales, dev.keepers->scales), 0);
    }
    EXPECT_EQ(again.keeper_fp16, dev.keeper_fp16);
    EXPECT_EQ(std::bit_cast<uint64_t>(again.loss), std::bit_cast<uint64_t>(dev.loss));
  }
}

// The whole `quantize --device cuda` path (streamed; GPTQ on the device) for each recipe the
// device runs, against the CPU path. The device's XᵀX differs from the CPU's in the last bits (fp32
// SSYRK summation order), so a code can flip where a value sits at a rounding tie; a flipped code
// changes the quantized layer's output, and from there the calibration stream carries the
// difference into every later layer's statistics and channel orders (as any last-bit change of XᵀX
// does on the CPU too: notes/quantization.md). So: every layer before the first that differs is
// identical, that first layer's differences are ties (at most 1% of its code bytes, no channel
// order moved), and the later layers are printed, not bounded.
TEST(QuantMath, Stories260KPackedCodesMatchTheCpuButForTies) {
  NIBBLE_REQUIRE_GPU();
  const char* data = std::getenv("NIBBLE_DATA");
  const std::filesystem::path model = std::filesystem::path(data ? data : "data") / "models/stories260K";
  if (!std::filesystem::exists(model / "model.safetensors")) GTEST_SKIP() << "no " << model;
  Progress::set_quiet(true);
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  std::vector<int32_t> calib(4096);
  for (auto& t : calib) t = int32_t(rng() % 512);
  for (const char* name : {"atom-w4a4", "atom-w4a4 --atom-compat", "w4a16-g128-gptq"}) {
    Recipe r = Recipe::preset(name == std::string("w4a16-g128-gptq") ? "w4a16-g128-gptq" : "atom-w4a4");
    if (name == std::string("atom-w4a4 --atom-compat")) r.apply_atom_compat();
    r.weight.group = 32;
    if (r.quantize_activations) r.act.group = 32;
    r.keeper = 8;
    r.calib_windows = 8;
    r.calib_ctx = 128;
    const auto dir = std::filesystem::temp_directory_path();
    std::shared_ptr<SafetensorsFile> files[2];
    for (int device = 0; device < 2; ++device) {
      CheckpointQuantizeOptions opt;
      opt.model = opt.tokenizer = model;
      opt.out = dir / (device ? "nibble_gpu_q.safetensors" : "nibble_cpu_q.safetensors");
      opt.show_progress = false;
      opt.on_device = device == 1;
      quantize_checkpoint(r, calib, opt);
      files[device] = SafetensorsFile::open(opt.out);
    }
    struct LayerDiff {
      int64_t code_bytes = 0, differing = 0, moved_orders = 0, other = 0;  // other: scales, norms, ... bytes
    };
    std::map<int, LayerDiff> layers;  // -1: the tensors outside the layers
    for (const auto& [tensor, t] : files[0]->tensors()) {
      const TensorInfo& u = files[1]->get(tensor);
      ASSERT_EQ(t.nbytes, u.nbytes) << tensor;
      int64_t d = 0;
      for (size_t i = 0; i < t.nbytes; ++i) d += t.data[i] != u.data[i];
      const int layer = tensor.starts_with("model.layers.") ? std::stoi(tensor.substr(13)) : -1;
      LayerDiff& ld = layers[layer];
      if (tensor.ends_with("codes")) {
        ld.code_bytes += int64_t(t.nbytes);
        ld.differing += d;
      } else if (tensor.ends_with("perm")) {
        ld.moved_orders += d > 0;
      } else {
        ld.other += d;
      }
    }
    int first = -2;  // the first layer that differs
    for (const auto& [layer, ld] : layers) {
      if (layer >= 0)
        std::printf("stories260K %s layer %d: %lld of %lld code bytes differ, %lld channel orders moved%s\n", name, layer,
                    (long long)ld.differing, (long long)ld.code_bytes, (long long)ld.moved_orders,
                    first >= 0 ? " (after the first difference: not bounded)" : "");
      if (first >= 0 || (ld.differing == 0 && ld.moved_orders == 0 && ld.other == 0)) continue;
      first = layer;
      EXPECT_GE(layer, 0) << name << ": the tensors outside the layers differ (seed " << seed << ")";
      EXPECT_LE(ld.differing, ld.code_bytes / 100) << name << " layer " << layer << " seed " << seed;
      EXPECT_EQ(ld.moved_orders, 0) << name << " layer " << layer << " seed " << seed;
    }
  }
}

TEST(QuantMath, Stories260KCalibrationPassesFallBackToTheCpu) {
  NIBBLE_REQUIRE_GPU();
  ModelConfig c = llama_like();
  c.head_dim = 8;  // stories260K's
  try {
    make_cuda_layer_stream(c, 1, 16);
    FAIL() << "a head_dim of 8 has no attention kernel: the stream must refuse it";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos) << e.what();
  }
}

// rms(a - b) / rms(b)
double rel_rms(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    n += double(b[i]) * b[i];
  }
  return std::sqrt(d / n);
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// max |a - b| / max |b|
double rel_max(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d / max_abs(b);
}

struct LayerRun {
  std::vector<std::vector<float>> hidden;  // per window, after the layer
  std::map<LinearSlot, InputStats> stats;
};

// Layer 0 over `windows` (embedded) on the CPU (Model::run_layer, host statistics in float64 from
// fp32 inputs) or through the device stream (statistics on the device from its fp16 inputs).
LayerRun run_layer0(Model& m, const std::vector<std::vector<float>>& windows, int64_t ctx, bool device) {
  const ModelConfig& c = m.config();
  LayerRun r;
  auto stats_for = [&](LinearSlot s, int64_t dim) -> InputStats& {
    auto [it, inserted] = r.stats.try_emplace(s);
    if (inserted) it->second = InputStats(dim, true, device);
    return it->second;
  };
  if (!device) {
    m.set_observer([&](int, LinearSlot s, int, const float* x, int64_t rows) {
      const int64_t dim = s == LinearSlot::Down ? c.intermediate_size : s == LinearSlot::O ? c.q_dim() : c.hidden_size;
      stats_for(s, dim).add(x, rows);
    });
    for (std::vector<float> h : windows) {
      m.run_layer(0, h.data(), ctx);
      r.hidden.push_back(std::move(h));
    }
    m.set_observer(nullptr);
    return r;
  }
  auto stream = make_cuda_layer_stream(c, int64_t(windows.size()), ctx);
  for (size_t w = 0; w < windows.size(); ++w) stream->set_window(int64_t(w), windows[w].data());
  stream->load_layer(m, 0);
  // Observing first: the stream must come back unchanged, with the same statistics as advancing.
  std::map<LinearSlot, InputStats> observed;
  stream->run(false, [&](LinearSlot s, int, const DeviceRows& x) {
    auto [it, inserted] = observed.try_emplace(s);
    if (inserted) it->second = InputStats(x.dim, true, true);
    it->second.add_device_f16(x.data, x.rows, x.stream);
  });
  std::vector<float> h(windows[0].size());
  stream->read_window(0, h.data());
  EXPECT_EQ(h, windows[0]) << "observing changed the stream";
  stream->run(true, [&](LinearSlot s, int, const DeviceRows& x) { stats_for(s, x.dim).add_device_f16(x.data, x.rows, x.stream); });
  for (auto& [slot, st] : observed) {
    EXPECT_EQ(st.count(), r.stats.at(slot).count());
    EXPECT_LE(rel_max(st.xtx(), r.stats.at(slot).xtx()), 1e-6) << linear_slot_name(slot) << ": observe vs advance";
  }
  for (size_t w = 0; w < windows.size(); ++w) {
    stream->read_window(int64_t(w), h.data());
    r.hidden.push_back(h);
  }
  return r;
}

std::vector<std::vector<float>> random_windows(const Model& m, std::mt19937_64& rng, int64_t count, int64_t ctx) {
  std::vector<std::vector<float>> windows;
  for (int64_t w = 0; w < count; ++w) {
    std::vector<int32_t> tokens(static_cast<size_t>(ctx));
    for (auto& t : tokens) t = int32_t(rng() % uint64_t(m.config().vocab_size));
    windows.push_back(m.embed(tokens));
  }
  return windows;
}

double rel_rms_windows(const LayerRun& a, const LayerRun& b) {
  double worst = 0;
  for (size_t w = 0; w < a.hidden.size(); ++w) worst = std::max(worst, rel_rms(a.hidden[w], b.hidden[w]));
  return worst;
}

// A random Llama-shaped model (head_dim 64: the kernels' shapes) and a generator, seeded afresh.
struct RandomLayerCase {
  uint64_t seed = fresh_seed();
  std::mt19937_64 rng{seed};
  ModelConfig c = llama_like();
  std::unique_ptr<Model> m = random_model(c, seed);
};

// The full-precision pass (what the statistics come from): the device's linear inputs are the
// CPU's rounded to fp16 (relative 2^-11 = 4.9e-4), so the hidden states and every statistic agree
// to a few times that: bound 4e-3 (rms of the hidden states; largest entry of Σx², Σ|x|, XᵀX).
TEST(QuantMath, LayerStreamFullPrecisionPassMatchesTheCpu) {
  NIBBLE_REQUIRE_GPU();
  RandomLayerCase t;
  auto& [seed, rng, c, m] = t;
  m->set_kv_format(KVFormat{32, false, 1.0f});
  const int64_t ctx = 128;
  const auto windows = random_windows(*m, rng, 3, ctx);
  const LayerRun cpu = run_layer0(*m, windows, ctx, false), dev = run_layer0(*m, windows, ctx, true);
  const double h_err = rel_rms_windows(dev, cpu);
  std::printf("seed %llu: full-precision layer, device vs cpu: hidden rel rms %.2e\n", (unsigned long long)seed, h_err);
  EXPECT_LE(h_err, 4e-3) << "seed " << seed;
  ASSERT_EQ(dev.stats.size(), cpu.stats.size());
  for (const auto& [slot, st] : cpu.stats) {
    const InputStats& d = dev.stats.at(slot);
    EXPECT_EQ(d.count(), st.count()) << linear_slot_name(slot);
    const double sq = rel_max(d.sum_sq(), st.sum_sq()), ab = rel_max(d.sum_abs(), st.sum_abs()),
                 xtx = rel_max(d.xtx(), st.xtx());
    std::printf("  %s: sum_sq %.2e, sum_abs %.2e, xtx %.2e\n", linear_slot_name(slot), sq, ab, xtx);
    EXPECT_LE(sq, 4e-3) << linear_slot_name(slot) << " seed " << seed;
    EXPECT_LE(ab, 4e-3) << linear_slot_name(slot) << " seed " << seed;
    EXPECT_LE(xtx, 4e-3) << linear_slot_name(slot) << " seed " << seed;
  }
}

// The quantized pass (what feeds the next layer): INT4 activation codes flip wherever fp16 moves a
// value across a rounding boundary, so the bound is the CPU's own sensitivity to fp16 activations
// on the same layer (as the executor's W4A4 test): device vs cpu within twice cpu-fp16 vs cpu, plus
// 2e-3 for the fp16 rounding every pass has (half the full-precision pass's bound). A wrong order,
// scale or rotation moves the layer's output by tens of percent.
// Atom's W4A4 (groups of 128, 128 INT8 keepers, INT4 KV: the W4A4 kernels) and a weight-only
// recipe, reordered (the stream runs it as its dequantized weights, un-permuted).
TEST(QuantMath, LayerStreamQuantizedPassWithinTheCpusFp16Sensitivity) {
  NIBBLE_REQUIRE_GPU();
  RandomLayerCase t;
  auto& [seed, rng, c, m0] = t;
  std::vector<int32_t> calib(4096);
  for (auto& id : calib) id = int32_t(rng() % uint64_t(c.vocab_size));
  Progress::set_quiet(true);
  for (const char* preset : {"atom-w4a4", "w4a16-g128-gptq"}) {
    Recipe r = Recipe::preset(preset);
    r.reorder = true;
    r.calib_windows = 4;
    r.calib_ctx = 128;
    auto m = random_model(c, seed);
    quantize_model(*m, r, calib, "random tokens", false);
    const int64_t ctx = 128;
    const auto windows = random_windows(*m, rng, 3, ctx);
    const LayerRun cpu = run_layer0(*m, windows, ctx, false), dev = run_layer0(*m, windows, ctx, true);
    m->set_fp16_activations(true);
    const LayerRun cpu16 = run_layer0(*m, windows, ctx, false);
    const double err = rel_rms_windows(dev, cpu), sensitivity = rel_rms_windows(cpu16, cpu);
    std::printf("seed %llu: %s layer, hidden rel rms: device vs cpu %.2e, cpu fp16 vs cpu %.2e\n",
                (unsigned long long)seed, preset, err, sensitivity);
    EXPECT_LE(err, 2 * sensitivity + 2e-3) << preset << " seed " << seed;
  }
}

// A whole --device cuda quantization whose calibration passes ran on the device: the forward
// passes differ from the CPU's by fp16 rounding, so codes are not comparable one by one (a moved
// salience order reshuffles a linear); what must hold is the result's accuracy: the quantized
// model's logits as close to the full-precision model's as the CPU path's are (within 20%).
TEST(QuantMath, RandomCheckpointQuantizedOnTheDeviceIsAsAccurateAsOnTheCpu) {
  NIBBLE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  Progress::set_quiet(true);
  const auto dir = std::filesystem::temp_directory_path() / ("nibble_gpu_stream_" + std::to_string(seed));
  SynthOptions so;
  so.config = llama_like();
  so.recipe = Recipe::preset("fp16");
  so.seed = seed;
  write_synthetic_model(so, dir / "ckpt");
  std::vector<int32_t> calib(8192);
  for (auto& t : calib) t = int32_t(rng() % uint64_t(so.config.vocab_size));
  Recipe r = Recipe::preset("atom-w4a4");
  r.calib_windows = 8;
  r.calib_ctx = 256;
  std::unique_ptr<Model> q[2];
  for (int device = 0; device < 2; ++device) {
    CheckpointQuantizeOptions opt;
    opt.model = dir / "ckpt";
    opt.out = dir / (device ? "gpu.safetensors" : "cpu.safetensors");
    opt.show_progress = false;
    opt.on_device = device == 1;
    const CheckpointQuantizeResult res = quantize_checkpoint(r, calib, opt);
    if (device) {
      EXPECT_TRUE(res.report.device_forward) << (res.report.warnings.empty() ? "" : res.report.warnings[0]);
      EXPECT_GT(res.report.peak_device_bytes, 0);
    }
    q[device] = load_packed_model(opt.out);
  }
  auto fp = Model::load(dir / "ckpt");
  std::vector<int32_t> tokens(256);
  for (auto& t : tokens) t = int32_t(rng() % uint64_t(so.config.vocab_size));
  auto logits = [&](Model& m) {
    auto cache = m.new_cache(int64_t(tokens.size()));
    const Step step{cache.get(), tokens, true};
    return m.forward(std::span<const Step>(&step, 1));
  };
  const std::vector<float> ref = logits(*fp);
  const double err_cpu = rel_rms(logits(*q[0]), ref), err_dev = rel_rms(logits(*q[1]), ref);
  std::printf("seed %llu: quantized logits rel rms vs full precision: cpu path %.4f, device path %.4f\n",
              (unsigned long long)seed, err_cpu, err_dev);
  EXPECT_LE(err_dev, 1.2 * err_cpu) << "seed " << seed;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace nibble::quant
