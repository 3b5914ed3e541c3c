// nibble split -m FP_DIR -q PACKED -f TEXT: where a quantized model's loss is. Each row puts one
// piece back to full precision (a whole layer with its K/V; one slot's activations or weights in
// every layer; K or V of the cache) or changes the K or V clip alone, and is scored on the same
// windows as the quantized model, against the FP model (perplexity, KLD, top-1).
#include <cstdio>
#include <functional>

#include "nibble/core/json.h"
#include "nibble/eval/perplexity.h"
#include "nibble/io/packed.h"
#include "nibble/io/text_file.h"
#include "nibble/quant/loss_split.h"
#include "nibble/quant/recipe.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {

struct SplitArgs {
  std::string model, text, tokenizer;
  std::vector<std::string> packed;  // the rows split the first; the others are scored as packed
  int64_t ctx = 0, chunks = 0;
  std::vector<std::string> parts = {"layers", "slots", "kv"};
  std::vector<float> k_clips, v_clips;
};

void run_split(const SplitArgs& a) {
  const Tokenizer tok = load_tokenizer(a.model, a.tokenizer);
  auto base = Model::load(a.model);
  const std::vector<int32_t> tokens = tok.encode(read_text_file(a.text), tok.bos_id() >= 0);
  const ModelConfig& c = base->config();
  const std::string& split = a.packed[0];
  const auto split_model = load_packed_model(split);
  const KVFormat kv = split_model->kv_format();
  const int layers = int(c.num_layers);
  auto has = [&](const std::string& p) { return std::find(a.parts.begin(), a.parts.end(), p) != a.parts.end(); };
  const quant::Recipe split_recipe =
      quant::Recipe::from_json(parse_json(split_model->metadata().at("nibble.recipe"), split), split);
  check(!has("slots") || !split_recipe.learns_v_rotation(), "nibble split",
        "{}: its learned V rotation is folded into the v rows and o_proj columns, so full-precision q/k/v or o_proj "
        "weights cannot be put back alone; use --parts layers,kv", split);
  // K and V of every layer in the packed model's format, but for `k` / `v` where given.
  auto kv_variant = [&](Model& q, std::function<KVFormat(int)> k, std::function<KVFormat(int)> v) {
    std::vector<KVFormat> kf, vf;
    for (int l = 0; l < layers; ++l) {
      kf.push_back(k ? k(l) : kv);
      vf.push_back(v ? v(l) : kv);
    }
    q.set_cache_factory([&c, kf, vf](int64_t n) { return quant::make_mixed_kv_cache(c, kf, vf, n); });
  };
  const KVFormat fp_kv{32, false, 1.0f};
  struct Variant {
    std::string file, label;
    std::function<void(Model& q)> change;  // applied to the freshly loaded file
  };
  std::vector<Variant> variants;
  for (const std::string& f : a.packed) variants.push_back({f, f + " (as packed)", [](Model&) {}});
  auto add = [&](std::string label, std::function<void(Model& q)> change) {
    variants.push_back({split, std::move(label), std::move(change)});
  };
  if (has("layers"))
    for (int l = 0; l < layers; ++l)
      add(fmt::format("layer {} at full precision (linears, K/V)", l), [&, l](Model& q) {
        auto fp = Model::load(a.model);
        quant::restore_layer(q, *fp, l);
        auto at_l = [&, l](int i) { return i == l ? fp_kv : kv; };
        kv_variant(q, at_l, at_l);
      });
  if (has("slots")) {
    for (LinearSlot s : {LinearSlot::QKV, LinearSlot::O, LinearSlot::GateUp, LinearSlot::Down})
      add(fmt::format("{} activations at full precision", linear_slot_name(s)),
          [s](Model& q) { quant::restore_activations(q, s); });
    for (LinearSlot s : {LinearSlot::QKV, LinearSlot::O})
      add(fmt::format("{} weights at full precision", linear_slot_name(s)), [&, s](Model& q) {
        auto fp = Model::load(a.model);
        quant::restore_weights(q, *fp, s);
      });
  }
  if (has("kv")) {
    add("K at full precision", [&](Model& q) { kv_variant(q, [&](int) { return fp_kv; }, {}); });
    add("V at full precision", [&](Model& q) { kv_variant(q, {}, [&](int) { return fp_kv; }); });
  }
  auto clipped = [&](float clip) {  // every layer in the packed format at another clip
    KVFormat f = kv;
    f.clip = clip;
    return std::function<KVFormat(int)>([f](int) { return f; });
  };
  for (float clip : a.k_clips)
    add(fmt::format("K clip {}", clip), [&, clip](Model& q) { kv_variant(q, clipped(clip), {}); });
  for (float clip : a.v_clips)
    add(fmt::format("V clip {}", clip), [&, clip](Model& q) { kv_variant(q, {}, clipped(clip)); });

  std::vector<std::unique_ptr<Model>> models;
  std::vector<Model*> ptrs;
  for (const Variant& v : variants) {
    models.push_back(load_packed_model(v.file));
    v.change(*models.back());
    ptrs.push_back(models.back().get());
  }
  PerplexityOptions opt;
  opt.ctx = a.ctx > 0 ? a.ctx : c.default_window();
  opt.max_windows = a.chunks;
  const auto results = perplexity_many(ptrs, tokens, opt, base.get());
  std::printf("rows split %s; %s: %lld windows of %lld tokens; FP perplexity %.4f\n\n", split.c_str(), a.text.c_str(),
              (long long)results[0].windows, (long long)opt.ctx, results[0].base_ppl);
  std::printf("| variant | ppl | vs FP | KLD mean | top-1 |\n|---|---|---|---|---|\n");
  for (size_t i = 0; i < variants.size(); ++i) {
    const PerplexityResult& r = results[i];
    std::printf("| %s | %.4f | %+.2f%% | %.4f | %.2f%% |\n", variants[i].label.c_str(), r.ppl,
                100 * (r.ppl / r.base_ppl - 1), r.kld_mean, 100 * r.top1);
  }
}

}  // namespace

void add_split_command(CLI::App& app) {
  auto a = std::make_shared<SplitArgs>();
  CLI::App* cmd = app.add_subcommand(
      "split", "Where a quantized model's loss is: pieces put back to full precision one at a time (layers, slots' "
               "activations or weights, K or V), or the K / V clip changed alone, scored against the FP model");
  cmd->add_option("-m,--model", a->model, "the full-precision Hugging Face checkpoint directory")->required();
  cmd->add_option("-q,--quantized", a->packed, "packed models quantized from it (the rows split the first; comma separated)")
      ->required()
      ->delimiter(',')
      ->check(CLI::ExistingFile);
  add_tokenizer_option(cmd, &a->tokenizer);
  cmd->add_option("-f,--file", a->text, "text to score (calibration text held out from quantization)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("-c,--ctx", a->ctx, "window length (default: min(2048, context))");
  cmd->add_option("--chunks", a->chunks, "score only the first N windows (0 = all)");
  cmd->add_option("--parts", a->parts, "rows: layers, slots, kv (comma separated; none: only the clip rows)")
      ->delimiter(',')
      ->check(CLI::IsMember({"layers", "slots", "kv", "none"}))
      ->capture_default_str();
  cmd->add_option("--k-clips", a->k_clips, "a row per K clip ratio (V as packed)")->delimiter(',');
  cmd->add_option("--v-clips", a->v_clips, "a row per V clip ratio (K as packed)")->delimiter(',');
  cmd->callback([a] { run_split(*a); });
}

}  // namespace nibble::cli
