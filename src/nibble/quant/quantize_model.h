// Quantizes a loaded model in place, layer by layer, the Atom way:
//   1. full-precision statistics of every linear's input (reorder metric), from the FP model;
//   2. permutations sorting channels by salience (keepers last), down_proj's folded into the
//      gate/up output rows, the others gathered at run time;
//   3. for GPTQ, XᵀX of each linear's inputs in the quantized model (earlier layers quantized);
//   4. RTN or GPTQ per linear, replaced by a QuantLinear; 5. the quantized layer's output feeds
//   the next layer. Memory: the model plus one layer's statistics and the calibration activations.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "nibble/backend/backend.h"
#include "nibble/model/model.h"
#include "nibble/quant/recipe.h"

namespace nibble::quant {

struct QuantizeReport {
  double seconds = 0;
  // Where the time went: calibration passes collecting statistics (the full-precision layer, and
  // with --hessian-quantized the gathered quantized inputs), GPTQ or rounding (with gathering and
  // rotating the weights into their order), and the passes of the quantized layer that feed the
  // next one.
  double stats_seconds = 0, quantize_seconds = 0, advance_seconds = 0;
  // quantize_checkpoint only: before the first layer (hashing the checkpoint, the tensors outside
  // the layers, embedding the calibration windows), and reading each layer and writing its file.
  double setup_seconds = 0, layer_io_seconds = 0;
  // --kv-rotation learned*: the time learning the rotations (sample passes included) and one line
  // per (layer, K or V, head) with its loss at the plain Hadamard and learned, training and held out.
  double kv_rotation_seconds = 0;
  std::vector<std::string> kv_rotation_losses;
  int64_t calib_windows = 0, calib_ctx = 0;
  int64_t peak_rss_bytes = 0;
  int64_t peak_device_bytes = 0;  // --device cuda: the most device memory seen in use (quant/device_math.h)
  bool device_forward = false;    // the calibration passes ran on the device (LayerStream)
  std::vector<std::string> warnings;
};

// Steps 1-5 for one layer at a time, holding the calibration windows' hidden states (fp32) from
// layer to layer: quantize_model drives it over a model in memory, quantize_checkpoint
// (quantize_checkpoint.h) over layers read one by one from the checkpoint.
class LayerQuantizer {
 public:
  using Embed = std::function<void(std::span<const int32_t> tokens, float* hidden)>;  // Model::embed
  // Samples the calibration windows and embeds them with `embed`; statistics and timings go to
  // `report`. on_device: the statistics and GPTQ on the CUDA device
  // (quant/device_math.h), and the calibration passes too, the stream resident there (LayerStream,
  // backend.h), where the recipe's passes and the layer's formats have kernels; otherwise (Atom's
  // Hessians from quantized inputs, a MoE, a format without a kernel: said in a warning) on the CPU.
  LayerQuantizer(Model& model, const Recipe& recipe, std::span<const int32_t> calib_tokens,
                 const std::string& calib_where, const Embed& embed, QuantizeReport& report, bool on_device = false);
  // False when the recipe changes no linear (fp16): layers stay as they are.
  bool active() const { return active_; }
  // Steps 1-4: model.layers()[l] (full precision) gets its QuantLinears; advances the
  // full-precision stream of --atom-compat on the way.
  void quantize(int l);
  // Step 5: the quantized layer l moves the calibration stream on to layer l + 1.
  void advance(int l);
  // A resumed run replays step 1's advance of the full-precision stream (--atom-compat) through
  // layer l at full precision, before advance(l) through the quantized layer.
  void advance_full_precision(int l);
  bool needs_full_precision_stream() const { return active_ && need_fp_stream_; }
  // The calibration window length `recipe` uses on `c`; 0 when it takes no calibration.
  static int64_t calib_window(const Recipe& recipe, const ModelConfig& c);
  // Bytes of the calibration streams `recipe` keeps on `c` (0 without calibration).
  static int64_t stream_bytes(const Recipe& recipe, const ModelConfig& c);

 private:
  Model& model_;
  const Recipe& recipe_;
  QuantizeReport& report_;
  bool on_device_;
  bool active_ = false, fused_stats_ = false, need_fp_stream_ = false, need_q_stream_ = false;
  // Runs layer l, as the model holds it now, over the stream on the device (advance: moving it on),
  // or returns false when the device cannot (then the stream is back on the host, said once).
  bool run_on_device(int l, bool advance, const DeviceLinearObserver& observer);
  void fall_back_to_host(const std::string& why);
  // Step 0 of quantize(l) for --kv-rotation learned*: K/V rotations of the full-precision layer l,
  // learned on the first calibration windows (V's folded, K's set as the layer's k_rotation).
  void learn_kv_rotations(int l);

  int64_t ctx_ = 0;
  std::vector<std::vector<float>> fp_stream_, q_stream_;
  // --device cuda: the one stream the recipe keeps (fp_stream_ or q_stream_) lives here instead.
  std::unique_ptr<LayerStream> device_stream_;
};

QuantizeReport quantize_model(Model& model, const Recipe& recipe, std::span<const int32_t> calib_tokens,
                              const std::string& calib_where, bool show_progress = true);

// Channel order sorting `metric` ascending (stable), so the largest channels come last; with
// act_order the first size - keeper (the INT4 part) descending instead, the keepers still last.
std::vector<int32_t> salience_order(const std::vector<double>& metric, int64_t keeper = 0, bool act_order = false);

// W[:, c] := W[:, perm[c]] for W [N, K] (empty perm: W).
std::vector<float> gather_columns(std::vector<float> w, int64_t N, int64_t K, const std::vector<int32_t>& perm);

// GPTQ's Hessian in a linear's channel order: Hp[i][j] = H[order[i]][order[j]] (empty order: H).
// Exposed for tests.
std::vector<double> permute_hessian(const std::vector<double>& H, const std::vector<int32_t>& order);
// H := R·H·R for R the orthonormal Hadamard of each `group`-wide block of the first `main` channels
// (identity on the keepers): the Hessian of group-rotated inputs. Computed in float. Exposed for tests.
void rotate_hessian_groups(std::vector<double>& H, int64_t K, int64_t main, int64_t group);

int64_t peak_rss_bytes();

}  // namespace nibble::quant
