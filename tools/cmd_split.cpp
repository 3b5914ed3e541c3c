// nibble split -m FP_DIR -q PACKED -f TEXT: where a quantized model's loss is. Each row puts one
// piece back to full precision (a whole layer with its K/V; one slot's activations or weights in
// every layer; K or V of the cache) or changes the K or V clip alone (globally, per layer, or one
// layer at a time: a coordinate search), or swaps in a KIVI-style K cache (a CPU simulation), and is
// scored on the same windows as the quantized model, against the FP model (perplexity, KLD, top-1).
#include <cstdio>
#include <functional>

#include <fmt/ranges.h>

#include "nibble/core/json.h"
#include "nibble/eval/perplexity.h"
#include "nibble/io/packed.h"
#include "nibble/io/text_file.h"
#include "nibble/quant/kv_quant.h"
#include "nibble/quant/loss_split.h"
#include "nibble/quant/recipe.h"
#include "tools/commands.h"

namespace nibble::cli {

namespace {

struct SplitArgs {
  std::string model, text, tokenizer;
  std::vector<std::string> packed;  // the rows split the first; the others are scored as packed
  int64_t ctx = 0, chunks = 0, skip_windows = 0;
  std::vector<std::string> parts = {"layers", "slots", "kv"};
  std::vector<float> k_clips, v_clips;
  std::vector<float> k_layer_clips, v_layer_clips;  // one ratio per layer: a row, and the search's base
  std::vector<float> clip_search;                   // a row per layer, K or V, and ratio
  std::vector<int> search_layers;                   // the layers clip_search covers (empty: all)
  int64_t k_block = 0;                              // > 0: rows of KIVI-style K caches in blocks of this many tokens
  std::vector<std::string> k_block_rows = {"channel", "channel-raw", "channel-all", "token"};
  bool rows_on_every_file = false;                  // the rows split each packed file, not only the first
  int64_t prefill_chunk = -1;                       // -1: k_block when there are block rows, else whole windows
};

// A --k-block-rows name: per channel or per token; "-raw" without the Hadamard rotation; "-all"
// every block quantized (no fp16 residual).
quant::BlockKeyFormat block_key_format(const std::string& name, int64_t block) {
  return {block, name.starts_with("channel"), !name.ends_with("-all"), name.find("-raw") == std::string::npos};
}

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
  check((!has("slots") && !has("layers")) || split_recipe.residual_rotation == quant::ResidualRotation::None,
        "nibble split",
        "{}: its residual stream is rotated (--residual-rotation {}), so the full-precision model's layers and "
        "weights are in another basis and cannot be put back; use --parts kv or none",
        split, quant::residual_rotation_name(split_recipe.residual_rotation));
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
    if (!a.rows_on_every_file) return variants.push_back({split, std::move(label), std::move(change)});
    for (const std::string& f : a.packed) variants.push_back({f, f + ": " + label, change});
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
  // Each layer's own K and V clip (--k-layer-clips / --v-layer-clips; as packed where not given): one
  // row, and the base the search rows start from.
  auto per_layer = [&](const std::vector<float>& clips, const char* part) {
    check(clips.empty() || int(clips.size()) == layers, "split", "--{}-layer-clips has {} ratios for {} layers", part,
          clips.size(), layers);
    return [&kv, clips](int l) {
      KVFormat f = kv;
      if (!clips.empty()) f.clip = clips[size_t(l)];
      return f;
    };
  };
  const std::function<KVFormat(int)> base_k = per_layer(a.k_layer_clips, "k"), base_v = per_layer(a.v_layer_clips, "v");
  if (!a.k_layer_clips.empty() || !a.v_layer_clips.empty()) {
    std::vector<std::string> lists;
    if (!a.k_layer_clips.empty()) lists.push_back(fmt::format("K clips [{}]", fmt::join(a.k_layer_clips, " ")));
    if (!a.v_layer_clips.empty()) lists.push_back(fmt::format("V clips [{}]", fmt::join(a.v_layer_clips, " ")));
    add(fmt::format("{} by layer", fmt::join(lists, ", ")), [&](Model& q) { kv_variant(q, base_k, base_v); });
  }
  // One step of a coordinate search: layer l's K (or V) at another clip, every other layer as the base.
  auto changed_at = [](std::function<KVFormat(int)> base, int layer, float clip) {
    return std::function<KVFormat(int)>([base, layer, clip](int l) {
      KVFormat f = base(l);
      if (l == layer) f.clip = clip;
      return f;
    });
  };
  for (int l = 0; l < layers; ++l) {
    if (!a.search_layers.empty() && std::find(a.search_layers.begin(), a.search_layers.end(), l) == a.search_layers.end())
      continue;
    for (float clip : a.clip_search) {
      add(fmt::format("layer {} K clip {}", l, clip),
          [&, l, clip](Model& q) { kv_variant(q, changed_at(base_k, l, clip), base_v); });
      add(fmt::format("layer {} V clip {}", l, clip),
          [&, l, clip](Model& q) { kv_variant(q, base_k, changed_at(base_v, l, clip)); });
    }
  }
  if (a.k_block > 0)
    for (const std::string& name : a.k_block_rows) {
      const quant::BlockKeyFormat bk = block_key_format(name, a.k_block);
      add(bk.describe() + ", V as packed", [&c, &kv, bk](Model& q) {
        q.set_cache_factory([&c, kv, bk](int64_t n) {
          return quant::make_block_key_kv_cache(c.num_layers, c.kv_dim(), c.head_dim, n, kv, bk);
        });
      });
    }

  std::vector<std::unique_ptr<Model>> models;
  std::vector<Model*> ptrs;
  for (const Variant& v : variants) {
    models.push_back(load_packed_model(v.file));
    // The rows' caches are built from the first file's format.
    check(!a.rows_on_every_file || v.file == split || models.back()->kv_format() == kv, "split",
          "{} has KV format {}, not the first file's {}", v.file, models.back()->kv_format().describe(), kv.describe());
    v.change(*models.back());
    ptrs.push_back(models.back().get());
  }
  PerplexityOptions opt;
  opt.ctx = a.ctx > 0 ? a.ctx : c.default_window();
  opt.max_windows = a.chunks;
  opt.prefill_chunk = a.prefill_chunk >= 0 ? a.prefill_chunk : a.k_block;
  const size_t skipped = size_t(a.skip_windows * opt.ctx);
  check(skipped < tokens.size(), "split", "--skip-windows {} skips the whole text", a.skip_windows);
  const auto results = perplexity_many(ptrs, std::span<const int32_t>(tokens).subspan(skipped), opt, base.get());
  std::printf("rows split %s (KV %s); %s: %lld windows of %lld tokens", split.c_str(), kv.describe().c_str(),
              a.text.c_str(), (long long)results[0].windows, (long long)opt.ctx);
  if (a.skip_windows > 0) std::printf(" after the first %lld", (long long)a.skip_windows);
  if (opt.prefill_chunk > 0) std::printf(" fed in pieces of %lld", (long long)opt.prefill_chunk);
  std::printf("; FP perplexity %.4f\n\n", results[0].base_ppl);
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
  cmd->add_option("--skip-windows", a->skip_windows,
                  "start after the first N windows (e.g. those a clip search was screened on)");
  cmd->add_option("--parts", a->parts, "rows: layers, slots, kv (comma separated; none: only the clip rows)")
      ->delimiter(',')
      ->check(CLI::IsMember({"layers", "slots", "kv", "none"}))
      ->capture_default_str();
  cmd->add_option("--k-clips", a->k_clips, "a row per K clip ratio (V as packed)")->delimiter(',');
  cmd->add_option("--v-clips", a->v_clips, "a row per V clip ratio (K as packed)")->delimiter(',');
  cmd->add_option("--clip-search", a->clip_search,
                  "a row per layer, K or V, and ratio: that layer's K (or V) clip alone changed from the per-layer "
                  "lists (or the packed clip): one step of a per-layer search")
      ->delimiter(',');
  cmd->add_option("--search-layers", a->search_layers, "the layers --clip-search covers (default: all)")
      ->delimiter(',');
  cmd->add_option("--k-layer-clips", a->k_layer_clips, "one K clip ratio per layer (with --v-layer-clips: one row)")
      ->delimiter(',');
  cmd->add_option("--v-layer-clips", a->v_layer_clips, "one V clip ratio per layer (with --k-layer-clips: one row)")
      ->delimiter(',');
  cmd->add_flag("--rows-on-every-file", a->rows_on_every_file,
               "every row for each packed file (same KV format), against one FP run: e.g. two calibration seeds");
  cmd->add_option("--k-block", a->k_block,
                  "rows of KIVI-style K caches (a CPU simulation) in blocks of this many tokens, V as packed");
  cmd->add_option("--k-block-rows", a->k_block_rows,
                  "which: channel (per-channel K scales, fp16 residual, Hadamard), channel-raw (no Hadamard), "
                  "channel-all (no residual), channel-raw-all, token (per-token K, fp16 residual)")
      ->delimiter(',')
      ->check(CLI::IsMember({"channel", "channel-raw", "channel-all", "channel-raw-all", "token"}))
      ->capture_default_str();
  cmd->add_option("--prefill-chunk", a->prefill_chunk,
                  "feed each window in pieces of N tokens, every row alike (default: --k-block, else whole windows)");
  cmd->callback([a] { run_split(*a); });
}

}  // namespace nibble::cli
