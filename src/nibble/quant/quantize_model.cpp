#include "nibble/quant/quantize_model.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>

#include "nibble/core/error.h"
#include "nibble/core/half.h"
#include "nibble/core/interrupt.h"
#include "nibble/core/parallel.h"
#include "nibble/core/progress.h"
#include "nibble/quant/calibrate.h"
#include "nibble/quant/device_math.h"
#include "nibble/quant/gptq.h"
#include "nibble/quant/kv_quant.h"
#include "nibble/quant/kv_rotation.h"
#include "nibble/quant/residual_rotation.h"
#include "nibble/quant/smooth.h"

namespace nibble::quant {

int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return int64_t(u.ru_maxrss) * 1024;
}

// The weight and Hessian reshuffles of a layer run row-parallel (a 7B layer has 202 M weights and
// down_proj's Hessian 121 M entries; with GPTQ on the device they are the host's part of a layer):
// every value is computed as serially.
std::vector<float> gather_columns(std::vector<float> w, int64_t N, int64_t K, const std::vector<int32_t>& perm) {
  if (perm.empty()) return w;
  std::vector<float> out(w.size());
  parallel_for(N, [&](int64_t n) {
    for (int64_t c = 0; c < K; ++c) out[size_t(n * K + c)] = w[size_t(n * K + perm[size_t(c)])];
  });
  return out;
}

// rotate_groups over rows [0, rows) in parallel chunks.
void rotate_groups_parallel(float* x, int64_t rows, int64_t K, int64_t main, int64_t group) {
  constexpr int64_t kRows = 64;
  parallel_for((rows + kRows - 1) / kRows, [&](int64_t c) {
    rotate_groups(x + c * kRows * K, std::min(kRows, rows - c * kRows), K, main, group);
  });
}

std::vector<int32_t> salience_order(const std::vector<double>& metric, int64_t keeper, bool act_order) {
  std::vector<int32_t> order(metric.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return metric[size_t(a)] < metric[size_t(b)]; });
  if (act_order) std::reverse(order.begin(), order.end() - keeper);
  return order;
}

std::vector<double> permute_hessian(const std::vector<double>& H, const std::vector<int32_t>& order) {
  if (order.empty()) return H;
  const int64_t K = int64_t(order.size());
  std::vector<double> Hp(H.size());
  parallel_for(K, [&](int64_t i) {
    for (int64_t j = 0; j < K; ++j) Hp[size_t(i * K + j)] = H[size_t(order[size_t(i)] * K + order[size_t(j)])];
  });
  return Hp;
}

void rotate_hessian_groups(std::vector<double>& H, int64_t K, int64_t main, int64_t group) {
  std::vector<float> HR(H.begin(), H.end());
  rotate_groups_parallel(HR.data(), K, K, main, group);  // H·R: each row's column blocks
  // R·(H·R): each column's row blocks, as hadamard_transform's butterflies applied to whole rows
  // (every column sees exactly that transform, without transposing K × K values twice).
  const float norm = 1.0f / std::sqrt(float(group));
  parallel_for(main / group, [&](int64_t b) {
    float* block = HR.data() + b * group * K;
    for (int64_t h = 1; h < group; h *= 2)
      for (int64_t i = 0; i < group; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          float* ra = block + j * K;
          float* rb = block + (j + h) * K;
          for (int64_t c = 0; c < K; ++c) {
            const float a = ra[c], b = rb[c];
            ra[c] = a + b;
            rb[c] = a - b;
          }
        }
    for (int64_t v = 0; v < group * K; ++v) block[v] *= norm;
  });
  std::copy(HR.begin(), HR.end(), H.begin());
}

namespace {

using Key = std::pair<LinearSlot, int>;  // (slot, expert; -1 outside a MoE)

// Minimum routed calibration tokens for an expert's own statistics.
constexpr int64_t kMinExpertTokens = 64;

DenseLinear& dense(Linear& l) {
  auto* d = dynamic_cast<DenseLinear*>(&l);
  check(d != nullptr, "quantize", "the model is already quantized: quantize a full-precision checkpoint");
  return *d;
}

// Rows of gate and up both reordered by `perm` (the intermediate channel order of down_proj).
void permute_gate_up_rows(DenseLinear& gu, int64_t I, const std::vector<int32_t>& perm) {
  const int64_t H = gu.in_features();
  std::vector<float> w(gu.weight().size());
  parallel_for(2 * I, [&](int64_t r) {  // r = half · I + i
    const int64_t half = r / I, i = r % I;
    std::copy_n(gu.weight().begin() + (half * I + perm[size_t(i)]) * H, H, w.begin() + r * H);
  });
  gu.weight() = std::move(w);
  if (!gu.bias().empty()) {
    std::vector<float> b(gu.bias().size());
    for (int half = 0; half < 2; ++half)
      for (int64_t i = 0; i < I; ++i) b[size_t(half * I + i)] = gu.bias()[size_t(half * I + perm[size_t(i)])];
    gu.bias() = std::move(b);
  }
}

std::vector<float> fp16_rounded(std::vector<float> v) {
  for (float& x : v) x = round_fp16(x);
  return v;
}

// One linear waiting to be quantized: its FP weight in permuted column order and its spec.
struct Pending {
  std::unique_ptr<Linear>* slot;
  std::vector<int32_t> perm;  // runtime gather (empty when folded or identity)
  std::vector<int32_t> order;  // the linear's channel c is statistics channel order[c] (gathered or folded)
  std::vector<float> weight;  // [N, K], permuted
  std::vector<float> bias;
  LinearQuantSpec spec;
  Key key;
  std::string name;
};

}  // namespace

LayerQuantizer::LayerQuantizer(Model& model, const Recipe& recipe, std::span<const int32_t> calib_tokens,
                               const std::string& calib_where, const Embed& embed, QuantizeReport& report,
                               bool on_device)
    : model_(model), recipe_(recipe), report_(report), on_device_(on_device) {
  const ModelConfig& c = model.config();
  recipe.validate(c);
  check(!(on_device && recipe.gptq && recipe.clip_by_gptq_loss), "quantize --device cuda",
        "--w-clip-gptq-loss has no device column loop: quantize it with --device cpu");
  model.set_fp16_activations(recipe.fp16_activations);  // calibrate as the quantized model will run
  active_ = recipe.quantize_weights || recipe.quantize_activations || recipe.reorder;  // as calib_window
  // Atom (--atom-compat) takes the reorder statistics from the FP model and GPTQ's Hessians from
  // the gathered, quantized inputs, which needs the order first: three passes per layer. The
  // default takes both from one pass over the calibration stream (earlier layers quantized, this
  // one full precision) and permutes the Hessians afterwards: two passes per layer.
  fused_stats_ = recipe.gptq && !recipe.hessian_from_quantized_inputs;
  need_fp_stream_ = recipe.reorder && !fused_stats_;
  need_q_stream_ = recipe.gptq;
  ctx_ = recipe.calib_ctx > 0 ? recipe.calib_ctx : c.default_window();
  if (!active_ || !recipe.needs_calibration()) return;  // needs_calibration() = need_fp_stream_ || need_q_stream_
  if (ctx_ > c.max_position_embeddings)
    report.warnings.push_back(fmt::format("calibration windows of {} tokens run past the model's context of {}: "
                                          "the statistics include positions the model never saw (as Atom's code "
                                          "does with its fixed 2048)",
                                          ctx_, c.max_position_embeddings));
  report.calib_ctx = ctx_;
  report.calib_windows = recipe.calib_windows;
  const auto windows = sample_calibration_windows(calib_tokens, recipe.calib_windows, ctx_, recipe.seed, calib_where);
  // --device cuda: the calibration passes on the device, the one stream the recipe keeps resident
  // there. Atom's Hessians from the gathered, quantized inputs (--hessian-quantized) come from a
  // host observer over a second stream: those passes stay on the CPU.
  if (on_device_ && recipe.gptq && recipe.hessian_from_quantized_inputs) {
    report.warnings.push_back("--device cuda: the calibration passes run on the CPU (statistics and GPTQ on the "
                              "device): Hessians from quantized inputs (--hessian-quantized, --atom-compat) have no "
                              "device path");
  } else if (on_device_) {
    try {
      device_stream_ = make_cuda_layer_stream(c, int64_t(windows.size()), ctx_);
    } catch (const Error& e) {
      report.warnings.push_back(fmt::format("--device cuda: the calibration passes run on the CPU: {}", e.what()));
    }
  }
  report.device_forward = device_stream_ != nullptr;
  const size_t window_values = size_t(ctx_ * c.hidden_size);
  if (device_stream_) {
    std::vector<float> h(window_values);  // one buffer for every window: no fresh 32 MB per 7B window
    for (size_t w = 0; w < windows.size(); ++w) {
      embed(windows[w], h.data());
      device_stream_->set_window(int64_t(w), h.data());
    }
    return;
  }
  check_fits_in_memory(double(stream_bytes(recipe, c)),
                       fmt::format("the hidden states of {} calibration windows of {} tokens", recipe.calib_windows,
                                   ctx_),
                       calib_where);
  for (const auto& w : windows) {
    for (auto* stream : {need_fp_stream_ ? &fp_stream_ : nullptr, need_q_stream_ ? &q_stream_ : nullptr})
      if (stream) embed(w, stream->emplace_back(w.size() * size_t(c.hidden_size)).data());
  }
}

bool LayerQuantizer::run_on_device(int l, bool advance, const DeviceLinearObserver& observer) {
  if (!device_stream_) return false;
  try {
    device_stream_->load_layer(model_, l);
  } catch (const Error& e) {
    fall_back_to_host(e.what());
    return false;
  }
  device_stream_->run(advance, observer);
  return true;
}

void LayerQuantizer::fall_back_to_host(const std::string& why) {
  std::vector<std::vector<float>>& host = need_fp_stream_ ? fp_stream_ : q_stream_;
  const ModelConfig& c = model_.config();
  check_fits_in_memory(double(stream_bytes(recipe_, c)), "the calibration stream, back from the device",
                       "--device cuda");
  host.assign(size_t(recipe_.calib_windows), std::vector<float>(size_t(ctx_ * c.hidden_size)));
  for (size_t w = 0; w < host.size(); ++w) device_stream_->read_window(int64_t(w), host[w].data());
  device_stream_.reset();
  report_.device_forward = false;
  report_.warnings.push_back(fmt::format("--device cuda: the calibration passes run on the CPU from here on: {}", why));
}

int64_t LayerQuantizer::calib_window(const Recipe& recipe, const ModelConfig& c) {
  const bool active = recipe.quantize_weights || recipe.quantize_activations || recipe.reorder;
  if (!active || !recipe.needs_calibration()) return 0;
  return recipe.calib_ctx > 0 ? recipe.calib_ctx : c.default_window();
}

int64_t LayerQuantizer::stream_bytes(const Recipe& recipe, const ModelConfig& c) {
  const int64_t ctx = calib_window(recipe, c);
  const bool fused = recipe.gptq && !recipe.hessian_from_quantized_inputs;
  const int streams = int(recipe.reorder && !fused) + int(recipe.gptq);
  return recipe.calib_windows * ctx * c.hidden_size * int64_t(sizeof(float)) * streams;
}

void LayerQuantizer::quantize(int l) {
  if (!active_) return;
  Model& model = model_;
  const Recipe& recipe = recipe_;
  QuantizeReport& report = report_;
  const ModelConfig& c = model.config();
  const int64_t ctx = ctx_, I = c.intermediate_size;
  const KVFormat fp_kv{32, false, 1.0f};
  Layer& layer = model.layers()[size_t(l)];
  const std::string lw = fmt::format("layer {}", l);

  // 1. Full-precision statistics of every linear input (the reorder metric); advances the FP stream.
  auto t0 = std::chrono::steady_clock::now();
  std::map<Key, InputStats> fp_stats;
  auto stats_for = [&](LinearSlot s, int e, bool with_xtx) -> InputStats& {
    auto [it, inserted] = fp_stats.try_emplace({s, e});
    const int64_t dim = s == LinearSlot::Down ? I : s == LinearSlot::O ? c.q_dim() : c.hidden_size;
    if (inserted) it->second = InputStats(dim, with_xtx && s != LinearSlot::Router, on_device_);
    return it->second;
  };
  // The same statistics from the host's observer and from the device stream's.
  auto collect = [&](bool with_xtx) {
    model.set_observer([&, with_xtx](int, LinearSlot s, int e, const float* x, int64_t rows) {
      stats_for(s, e, with_xtx).add(x, rows);
    });
    return DeviceLinearObserver([&, with_xtx](LinearSlot s, int e, const DeviceRows& x) {
      stats_for(s, e, with_xtx).add_device_f16(x.data, x.rows, x.stream);
    });
  };
  if (recipe.kv_rotation != KVRotation::Hadamard) learn_kv_rotations(l);
  model.set_kv_format(fp_kv);
  if (need_fp_stream_) {
    const DeviceLinearObserver on_device = collect(false);
    if (!run_on_device(l, true, on_device))
      for (auto& h : fp_stream_) {
        throw_if_interrupted(lw);
        model.run_layer(l, h.data(), ctx);
      }
  } else if (fused_stats_) {
    const DeviceLinearObserver on_device = collect(true);
    if (!run_on_device(l, false, on_device))
      for (const auto& h : q_stream_) {
        throw_if_interrupted(lw);
        model.observe_layer(l, h.data(), ctx);
      }
  }
  model.set_observer(nullptr);
  report.stats_seconds += seconds_since(t0);
  // 1b. SmoothQuant's migration folded into the layer (quant/smooth.h); the statistics follow it.
  if (recipe.smooth_alpha > 0)
    for (LinearSlot slot : {LinearSlot::QKV, LinearSlot::GateUp, LinearSlot::Down}) {
      InputStats& st = fp_stats.at({slot, -1});
      DenseLinear& d = dense(slot == LinearSlot::QKV      ? *layer.qkv
                             : slot == LinearSlot::GateUp ? *layer.experts[0].gate_up
                                                          : *layer.experts[0].down);
      const int64_t keeper = recipe.linear_spec(d.in_features(), lw, slot).keeper;
      std::vector<double> s = smoothing_scales(st.sum_sq(), st.count(), d.weight(), d.out_features(), d.in_features(),
                                               recipe.smooth_alpha, keeper);
      fold_input_scales(layer, slot, s, I);
      for (double& v : s) v = 1 / v;
      st.scale_channels(s);
    }
  // 1c. SmoothAttention for the K cache, folded into the q and k rows (the statistics are unchanged).
  if (recipe.k_smooth_alpha > 0) {
    const InputStats& st = fp_stats.at({LinearSlot::QKV, -1});
    fold_key_scales(layer, c, key_smoothing_scales(st.xtx(), st.count(), dense(*layer.qkv).weight(), c,
                                                   recipe.k_smooth_alpha));
  }
  auto order_for = [&](Key k, Key fallback) -> std::vector<int32_t> {
    if (!recipe.reorder) return {};
    auto it = fp_stats.find(k);
    if (it == fp_stats.end() || it->second.count() < kMinExpertTokens) {
      if (k.second >= 0)
        report.warnings.push_back(fmt::format("{} expert {}: {} calibration tokens routed to it (< {}); using the "
                                              "statistics of all tokens reaching the layer",
                                              lw, k.second, it == fp_stats.end() ? 0 : it->second.count(),
                                              kMinExpertTokens));
      it = fp_stats.find(fallback);
      if (it == fp_stats.end()) return {};
    }
    const std::vector<double>& metric =
        recipe.sort_metric == SortMetric::Hessian ? it->second.sum_sq() : it->second.sum_abs();
    return salience_order(metric, recipe.linear_spec(int64_t(metric.size()), lw, k.first).keeper, recipe.act_order);
  };

  // 2. Orders, folded (down_proj) or kept for the run-time gather (the rest). Timed with step 4:
  //    the weights are gathered (and rotated) for GPTQ here.
  t0 = std::chrono::steady_clock::now();
  std::vector<Pending> pending;
  auto add = [&](std::unique_ptr<Linear>* slot, std::vector<int32_t> perm, Key key, std::string name,
                 std::vector<int32_t> folded = {}) {
    DenseLinear& d = dense(**slot);
    const int64_t N = d.out_features(), K = d.in_features();
    std::vector<int32_t> order = folded.empty() ? perm : folded;
    // The weight moves into GPTQ's order: the linear is replaced before it runs again.
    Pending p{slot, perm, std::move(order), gather_columns(std::move(d.weight()), N, K, perm), fp16_rounded(d.bias()),
              recipe.linear_spec(K, lw + " " + name, key.first), key, name};
    // Group-rotated recipes hold W·Hᵀ from here on, so every pass computes the same products.
    if (p.spec.group_hadamard) rotate_groups_parallel(p.weight.data(), N, K, K - p.spec.keeper, p.spec.weight.group);
    pending.push_back(std::move(p));
  };
  add(&layer.qkv, order_for({LinearSlot::QKV, -1}, {LinearSlot::QKV, -1}), {LinearSlot::QKV, -1}, "q/k/v");
  add(&layer.o, order_for({LinearSlot::O, -1}, {LinearSlot::O, -1}), {LinearSlot::O, -1}, "o_proj");
  for (size_t e = 0; e < layer.experts.size(); ++e) {
    const int tag = layer.router ? int(e) : -1;
    Expert& ex = layer.experts[e];
    const std::vector<int32_t> down_order = order_for({LinearSlot::Down, tag}, {LinearSlot::Down, tag});
    if (!down_order.empty()) {
      permute_gate_up_rows(dense(*ex.gate_up), I, down_order);
      DenseLinear& dn = dense(*ex.down);
      dn.weight() = gather_columns(dn.weight(), dn.out_features(), I, down_order);
    }
    const std::string en = layer.router ? fmt::format(" expert {}", e) : "";
    add(&ex.gate_up, order_for({LinearSlot::GateUp, tag}, {LinearSlot::Router, -1}), {LinearSlot::GateUp, tag},
        "gate/up" + en);
    add(&ex.down, {}, {LinearSlot::Down, tag}, "down_proj" + en, down_order);
  }
  report.quantize_seconds += seconds_since(t0);

  // 3. GPTQ's Hessians from the quantized model's stream, the layer's activations quantized as
  //    it will run (Atom), its weights still full precision.
  std::map<Key, std::vector<double>> hessians;
  t0 = std::chrono::steady_clock::now();
  if (fused_stats_) {
    for (const auto& p : pending) {
      auto it = fp_stats.find(p.key);
      if (it == fp_stats.end() || !it->second.has_xtx()) continue;
      hessians[p.key] = permute_hessian(it->second.xtx(), p.order);
    }
    fp_stats.clear();  // the orders are chosen: only the permuted Hessians are needed from here
  } else if (recipe.gptq) {
    std::map<Key, InputStats> quantized_inputs;
    std::map<Key, const Pending*> by_key;
    for (auto& p : pending) {
      by_key[p.key] = &p;
      *p.slot = QuantLinear::activation_only(p.spec, (*p.slot)->out_features(), (*p.slot)->in_features(), p.perm,
                                             p.weight, p.bias);
    }
    model.set_kv_format(recipe.kv);
    model.set_observer([&](int, LinearSlot s, int e, const float* x, int64_t rows) {
      auto pit = by_key.find({s, e});
      if (pit == by_key.end()) return;
      const Pending& p = *pit->second;
      const int64_t K = (*p.slot)->in_features();
      std::vector<float> xg(size_t(rows * K));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) xg[size_t(r * K + k)] = x[r * K + (p.perm.empty() ? k : p.perm[size_t(k)])];
      if (recipe.hessian_from_quantized_inputs) quantize_activations(xg.data(), rows, K, p.spec);
      auto [it, inserted] = quantized_inputs.try_emplace(p.key);
      if (inserted) it->second = InputStats(K, true, on_device_);
      it->second.add(xg.data(), rows);
    });
    for (const auto& h : q_stream_) {
      throw_if_interrupted(lw);
      model.observe_layer(l, h.data(), ctx);
    }
    model.set_observer(nullptr);
    for (auto& [key, st] : quantized_inputs) hessians[key] = st.xtx();
  }
  report.stats_seconds += seconds_since(t0);

  // 4. Quantize every linear (RTN or GPTQ) and install it.
  //    The linears are independent: one thread each. BLAS and LAPACK run single-threaded inside
  //    (as with one thread), so GPTQ's codes do not depend on the thread count. With GPTQ on the
  //    device (factor, column loop and updates: gptq_device.cu) the linears go one at a time, each
  //    filling the device.
  t0 = std::chrono::steady_clock::now();
  std::vector<std::string> rtn_fallback(pending.size());  // by index: the same order on every run
  parallel_for(int64_t(pending.size()), [&](int64_t i) {
    Pending& p = pending[size_t(i)];
    const int64_t K = (*p.slot)->in_features(), N = (*p.slot)->out_features();
    const std::string where = lw + " " + p.name;
    if (p.spec.group_hadamard) {
      // The Hessian of the rotated inputs is R·H·R (R symmetric), unless it was collected from
      // inputs already rotated by quantize_activations (the --hessian-quantized pass).
      const int64_t main = K - p.spec.keeper, G = p.spec.weight.group;
      auto hit = hessians.find(p.key);
      if (hit != hessians.end() && !recipe.hessian_from_quantized_inputs) rotate_hessian_groups(hit->second, K, main, G);
    }
    if (!p.spec.quantize_weights) {
      *p.slot = QuantLinear::activation_only(p.spec, N, K, p.perm, std::move(p.weight), std::move(p.bias));
      return;
    }
    auto hit = hessians.find(p.key);
    if (recipe.gptq && hit != hessians.end()) {
      GptqOptions opt;
      opt.block = recipe.gptq_block;
      opt.percdamp = recipe.percdamp;
      opt.clip_search = recipe.clip_search;
      opt.clip_by_gptq_loss = recipe.clip_by_gptq_loss;
      opt.on_device = on_device_;
      GptqResult g = gptq_quantize(p.weight, N, K, std::move(hit->second), p.spec, opt, where);
      std::vector<float>().swap(p.weight);  // a layer's linears in flight hold one fp32 copy less
      *p.slot = std::make_unique<QuantLinear>(p.spec, std::move(p.perm), std::move(g.main), std::move(g.keepers),
                                              std::move(g.keeper_fp16), std::move(p.bias));
    } else {
      if (recipe.gptq) rtn_fallback[size_t(i)] = where + ": no calibration inputs reached it; quantized by RTN instead of GPTQ";
      *p.slot = quantize_linear_rtn(p.weight, N, K, p.spec, std::move(p.perm), std::move(p.bias), where);
    }
  }, !(on_device_ && recipe.gptq), Schedule::Dynamic);
  for (std::string& w : rtn_fallback)
    if (!w.empty()) report.warnings.push_back(std::move(w));

  report.quantize_seconds += seconds_since(t0);
}

void LayerQuantizer::learn_kv_rotations(int l) {
  // Training on the first windows, the next one held out for the report.
  constexpr int64_t kTrainWindows = 2, kHeldoutWindows = 1;
  const auto t0 = std::chrono::steady_clock::now();
  const ModelConfig& c = model_.config();
  const int64_t d = c.head_dim, kvh = c.num_kv_heads, qd = c.q_dim(), kvd = c.kv_dim(),
                per_group = c.num_heads / kvh;
  const int64_t windows = std::min(kTrainWindows + kHeldoutWindows, recipe_.calib_windows);
  const int64_t train_rows = std::min(kTrainWindows, windows - 1) * ctx_;
  std::vector<float> q, k, v;  // [rows, q_dim], [rows, kv_dim] of the sampled windows, post-RoPE
  model_.set_attention_observer([&](int layer, const float* qr, const float* kr, const float* vr, int64_t rows) {
    if (layer != l) return;
    q.insert(q.end(), qr, qr + rows * qd);
    k.insert(k.end(), kr, kr + rows * kvd);
    v.insert(v.end(), vr, vr + rows * kvd);
  });
  model_.set_kv_format(KVFormat{32, false, 1.0f});
  const std::vector<std::vector<float>>& host = need_fp_stream_ ? fp_stream_ : q_stream_;
  std::vector<float> window(size_t(ctx_ * c.hidden_size));
  for (int64_t w = 0; w < windows; ++w) {
    if (device_stream_) device_stream_->read_window(w, window.data());
    model_.observe_layer(l, device_stream_ ? window.data() : host[size_t(w)].data(), ctx_);
  }
  model_.set_attention_observer(nullptr);
  const int64_t rows = int64_t(k.size()) / kvd;

  Layer& layer = model_.layers()[size_t(l)];
  const auto& o = dense(*layer.o);
  const FormatSpec spec = kv_format_spec(recipe_.kv, d);
  // Problems 2g (K of head g) and 2g + 1 (V of head g).
  std::vector<RotationProblem> problems(size_t(2 * kvh));
  for (int64_t g = 0; g < kvh; ++g) {
    for (int part = 0; part < 2; ++part) {
      RotationProblem& p = problems[size_t(2 * g + part)];
      p.dim = d;
      p.spec = spec;
      p.metric.assign(size_t(d * d), 0.0);
      const std::vector<float>& src = part == 0 ? k : v;
      for (int64_t t = 0; t < rows; ++t) {
        auto& dst = t < train_rows ? p.train : p.heldout;
        dst.insert(dst.end(), src.begin() + t * kvd + g * d, src.begin() + t * kvd + (g + 1) * d);
      }
    }
    // K: the logits' error q·e over the group's queries, M = E[q·qᵀ] on the training rows.
    std::vector<double>& mk = problems[size_t(2 * g)].metric;
    for (int64_t t = 0; t < train_rows; ++t)
      for (int64_t h = g * per_group; h < (g + 1) * per_group; ++h) {
        const float* x = q.data() + t * qd + h * d;
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j) mk[size_t(i * d + j)] += double(x[i]) * x[j] / double(train_rows * per_group);
      }
    // V: the layer output's error W_o·e, M = Σ over the group's heads of W_o[:, head]ᵀ·W_o[:, head].
    std::vector<double>& mv = problems[size_t(2 * g + 1)].metric;
    for (int64_t h = g * per_group; h < (g + 1) * per_group; ++h)
      for (int64_t n = 0; n < o.out_features(); ++n) {
        const float* w = o.weight().data() + n * qd + h * d;
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j) mv[size_t(i * d + j)] += double(w[i]) * w[j];
      }
  }
  std::vector<LearnedRotation> learned(problems.size());
  parallel_for(int64_t(problems.size()), [&](int64_t i) {
    const bool wanted = i % 2 == 0 ? recipe_.learns_k_rotation() : recipe_.learns_v_rotation();
    if (wanted) learned[size_t(i)] = learn_rotation(problems[size_t(i)]);
  }, true, Schedule::Dynamic);
  std::vector<double> rk, rv;
  for (int64_t i = 0; i < int64_t(problems.size()); ++i) {
    const LearnedRotation& r = learned[size_t(i)];
    if (r.rotation.empty()) continue;
    (i % 2 == 0 ? rk : rv).insert((i % 2 == 0 ? rk : rv).end(), r.rotation.begin(), r.rotation.end());
    report_.kv_rotation_losses.push_back(
        fmt::format("layer {} {} head {}: loss {:.6g} -> {:.6g} ({:+.1f}%) on {} training rows, {:.6g} -> {:.6g} "
                    "({:+.1f}%) held out",
                    l, i % 2 == 0 ? "K" : "V", i / 2, r.train_hadamard, r.train_learned,
                    100 * (r.train_learned / r.train_hadamard - 1), train_rows, r.heldout_hadamard, r.heldout_learned,
                    100 * (r.heldout_learned / r.heldout_hadamard - 1)));
  }
  if (!rv.empty()) fold_value_rotation(layer, c, rv);
  if (!rk.empty()) layer.k_rotation.assign(rk.begin(), rk.end());
  report_.kv_rotation_seconds += seconds_since(t0);
}

void LayerQuantizer::advance(int l) {
  // 5. The quantized layer's outputs are the next layer's calibration inputs (the last feeds none).
  const auto t0 = std::chrono::steady_clock::now();
  if (active_ && need_q_stream_ && l + 1 < int(model_.config().num_layers)) {
    model_.set_kv_format(recipe_.kv);
    if (!run_on_device(l, true, {}))
      for (auto& h : q_stream_) {
        throw_if_interrupted(fmt::format("layer {}", l));
        model_.run_layer(l, h.data(), ctx_);
      }
  }
  report_.advance_seconds += seconds_since(t0);
  report_.peak_rss_bytes = std::max(report_.peak_rss_bytes, peak_rss_bytes());
  if (on_device_) report_.peak_device_bytes = std::max(report_.peak_device_bytes, device_memory_peak());
}

void LayerQuantizer::advance_full_precision(int l) {
  if (!active_ || !need_fp_stream_) return;
  const auto t0 = std::chrono::steady_clock::now();
  model_.set_kv_format(KVFormat{32, false, 1.0f});
  if (!run_on_device(l, true, {}))
    for (auto& h : fp_stream_) model_.run_layer(l, h.data(), ctx_);
  report_.advance_seconds += seconds_since(t0);
}

QuantizeReport quantize_model(Model& model, const Recipe& recipe, std::span<const int32_t> calib_tokens,
                              const std::string& calib_where, bool show_progress) {
  const ModelConfig& c = model.config();
  QuantizeReport report;
  recipe.validate(c);
  // Before the calibration windows are embedded: every statistic is of the rotated network.
  if (recipe.residual_rotation != ResidualRotation::None)
    rotate_model_residual(model, residual_rotation_matrix(recipe.residual_rotation, c.hidden_size, recipe.seed));
  Progress progress("quantize", c.num_layers, "layers");
  LayerQuantizer q(model, recipe, calib_tokens, calib_where,
                   [&](std::span<const int32_t> w, float* h) { model.embed(w, h); }, report);
  if (q.active())
    for (int l = 0; l < int(c.num_layers); ++l) {
      q.quantize(l);
      q.advance(l);
      if (show_progress) progress.update(l + 1, fmt::format("peak RSS {:.0f} MB", double(peak_rss_bytes()) / 1e6));
    }
  model.set_kv_format(recipe.kv);
  if (!q.active()) return report;
  report.seconds = progress.elapsed_seconds();
  if (show_progress) progress.finish(fmt::format("peak RSS {:.0f} MB", double(peak_rss_bytes()) / 1e6));
  return report;
}

}  // namespace nibble::quant
