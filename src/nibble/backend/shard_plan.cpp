#include "nibble/backend/shard_plan.h"

#include <cmath>
#include <numeric>

#include "nibble/core/error.h"
#include "nibble/quant/quant_linear.h"

namespace nibble {

using quant::QuantizedMatrix;
using quant::QuantLinear;

namespace {

// How a linear's K may be cut: at multiples of `unit` up to `main`; the channels past `main` (the
// keepers) stay together on the last rank.
struct KSplit {
  int64_t unit = 1, main = 0;
};

KSplit k_split(const Linear& l, const std::string& where) {
  const auto* q = dynamic_cast<const QuantLinear*>(&l);
  if (!q) return {1, l.in_features()};
  const quant::LinearQuantSpec& s = q->spec();
  KSplit k{1, l.in_features() - s.keeper};
  if (s.quantize_weights && s.weight.group > 0) k.unit = std::lcm(k.unit, int64_t(s.weight.group));
  if (s.act) {
    // A scale over a whole token row (w8a8, w4a4-rtn) or NVFP4's per-row tensor scale would need
    // a max over every rank's channels before quantizing: not implemented.
    check(s.act->group > 0 && s.act->format != quant::Format::Nvfp4, where,
          "activations quantized with one {} scale per token over the whole row cannot be split across ranks "
          "(tensor parallelism needs activation groups along K)",
          quant::format_name(s.act->format));
    k.unit = std::lcm(k.unit, int64_t(s.act->group));
  }
  return k;
}

// world + 1 boundaries along K, as even as whole units allow, the keepers on the last rank.
std::vector<int64_t> k_bounds(int64_t K, const KSplit& k, int world, const std::string& where) {
  std::vector<int64_t> b(size_t(world) + 1, K);
  b[0] = 0;
  const int64_t last_cut = k.main / k.unit * k.unit;
  for (int r = 1; r < world; ++r) {
    const double ideal = double(K) * r / world / double(k.unit);
    b[size_t(r)] = std::min(int64_t(std::llround(ideal)) * k.unit, last_cut);
    check(b[size_t(r)] > b[size_t(r) - 1] && b[size_t(r)] < K, where,
          "{} input channels ({} in units of {}, {} keepers kept on one rank) cannot give each of {} ranks a "
          "whole unit",
          K, k.main, k.unit, K - k.main, world);
  }
  return b;
}

bool legal_bounds(const std::vector<int64_t>& b, const KSplit& k) {
  for (size_t r = 1; r + 1 < b.size(); ++r)
    if (b[r] % k.unit != 0 || b[r] > k.main) return false;
  return true;
}

// Rows `rows` and columns `cols` of a row-major matrix of `stride` columns (empty stays empty).
template <typename T>
std::vector<T> take(const std::vector<T>& v, int64_t stride, const std::vector<ChannelRange>& rows,
                    ChannelRange cols) {
  std::vector<T> out;
  if (v.empty()) return out;
  for (const ChannelRange& r : rows)
    for (int64_t n = r.begin; n < r.end; ++n)
      out.insert(out.end(), v.begin() + n * stride + cols.begin, v.begin() + n * stride + cols.end);
  return out;
}

// Rows `rows` (each whole row groups) and columns `cols` of q.
QuantizedMatrix slice(const QuantizedMatrix& q, const std::vector<ChannelRange>& rows, ChannelRange cols,
                      const std::string& where) {
  const int64_t g = q.group_size(), rg = q.spec.row_group;
  const bool whole_row_scale = q.spec.group == 0;  // one scale per row: it holds for any columns
  check(whole_row_scale || q.scales.empty() || (cols.begin % g == 0 && cols.end % g == 0), where,
        "columns {}..{} cut a quantization group of {}", cols.begin, cols.end, g);
  QuantizedMatrix out;
  out.spec = q.spec;
  out.cols = cols.size();
  out.tensor_scale = q.tensor_scale;
  out.codes = take(q.codes, q.cols, rows, cols);
  // Scales and zeros: [rows / row_group, groups], cut at the same rows and at the groups of `cols`.
  std::vector<ChannelRange> blocks;
  for (const ChannelRange& r : rows) {
    check(r.begin % rg == 0 && r.end % rg == 0, where, "rows {}..{} cut a row group of {}", r.begin, r.end, rg);
    out.rows += r.size();
    blocks.push_back({r.begin / rg, r.end / rg});
  }
  const ChannelRange groups = whole_row_scale ? ChannelRange{0, 1} : ChannelRange{cols.begin / g, cols.end / g};
  out.scales = take(q.scales, q.cols / g, blocks, groups);
  out.zeros = take(q.zeros, q.cols / g, blocks, groups);
  return out;
}

// The part of `l` on rows `rows` and (permuted) input columns `cols`. A column cut drops the input
// permutation (the caller gathers the input) and keeps the bias only where keep_bias says (a
// row-parallel layer's bias is added once, by rank 0).
std::unique_ptr<Linear> cut(const Linear& l, const std::vector<ChannelRange>& rows, ChannelRange cols, bool keep_bias,
                            const std::string& where) {
  const int64_t K = l.in_features();
  const bool all_cols = cols.begin == 0 && cols.end == K;
  int64_t n_out = 0;
  for (const ChannelRange& r : rows) n_out += r.size();
  if (const auto* d = dynamic_cast<const DenseLinear*>(&l)) {
    const int bytes = int(d->storage_bytes() / int64_t(d->weight().size() + d->bias().size()));
    return std::make_unique<DenseLinear>(cols.size(), n_out, take(d->weight(), K, rows, cols),
                                         keep_bias ? take(d->bias(), 1, rows, {0, 1}) : std::vector<float>{}, bytes);
  }
  const auto* q = dynamic_cast<const QuantLinear*>(&l);
  check(q != nullptr, where, "a linear of a kind tensor parallelism cannot split");
  quant::LinearQuantSpec spec = q->spec();
  const int64_t main = K - spec.keeper;
  check(cols.end == K || cols.end <= main, where, "columns {}..{} cut the {} keepers", cols.begin, cols.end,
        spec.keeper);
  std::vector<float> bias = keep_bias ? take(q->bias(), 1, rows, {0, 1}) : std::vector<float>{};
  std::vector<int32_t> perm = all_cols ? q->perm() : std::vector<int32_t>{};
  if (!spec.quantize_weights)
    return QuantLinear::activation_only(spec, n_out, cols.size(), std::move(perm),
                                        take(q->dequantized(), K, rows, cols), std::move(bias));
  const ChannelRange main_cols{cols.begin, std::min(cols.end, main)};
  QuantizedMatrix m = slice(q->main(), rows, main_cols, where);
  std::optional<QuantizedMatrix> keepers;
  std::vector<uint16_t> keeper_fp16;
  if (cols.end == K && spec.keeper > 0) {
    const ChannelRange all_keepers{0, spec.keeper};
    if (q->keepers()) keepers = slice(*q->keepers(), rows, all_keepers, where + " keepers");
    keeper_fp16 = take(q->keeper_fp16(), spec.keeper, rows, all_keepers);
  } else {
    spec.keeper = 0;
  }
  return std::make_unique<QuantLinear>(spec, std::move(perm), std::move(m), std::move(keepers), std::move(keeper_fp16),
                                       std::move(bias));
}

std::vector<ChannelRange> all_rows(const Linear& l) { return {{0, l.out_features()}}; }

}  // namespace

ChannelSubsetLinear::ChannelSubsetLinear(int64_t in, std::vector<int32_t> channels, std::unique_ptr<Linear> inner)
    : Linear(in, inner->out_features()), channels_(std::move(channels)), inner_(std::move(inner)) {
  check(int64_t(channels_.size()) == inner_->in_features(), "ChannelSubsetLinear", "{} channels for {} inputs",
        channels_.size(), inner_->in_features());
}

void ChannelSubsetLinear::forward(const float* x, int64_t rows, float* y) const {
  const int64_t K = in_features(), k = int64_t(channels_.size());
  std::vector<float> picked(size_t(rows * k));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k; ++c) picked[size_t(r * k + c)] = x[r * K + channels_[size_t(c)]];
  inner_->forward(picked.data(), rows, y);
}

ShardPlan::ShardPlan(const Model& model, int world) : world_(world), config_(model.config()) {
  const ModelConfig& c = config_;
  const std::string tp = fmt::format("--tp {}", world);
  check(world >= 1, tp, "the tensor-parallel degree must be at least 1");
  check(c.num_heads % world == 0, tp, "num_attention_heads {} is not divisible by {} ranks", c.num_heads, world);
  check(c.num_kv_heads % world == 0 || world % c.num_kv_heads == 0, tp,
        "num_key_value_heads {} and {} ranks: one must divide the other (each rank's q heads read whole KV heads)",
        c.num_kv_heads, world);
  heads_ = c.num_heads / world;
  kv_heads_ = std::max<int64_t>(c.num_kv_heads / world, 1);
  vocab_per_rank_ = (c.vocab_size + world - 1) / world;
  check(c.vocab_size - (world - 1) * vocab_per_rank_ > 0, tp, "a vocabulary of {} cannot give each of {} ranks a slice",
        c.vocab_size, world);

  // The intermediate channels: down_proj's K split, which gate/up's rows follow (whole row groups).
  const Layer& first = model.layers().at(0);
  const std::string down_where = fmt::format("{}: layer 0 down_proj", tp);
  KSplit down = k_split(*first.experts.at(0).down, down_where);
  const auto* gu = dynamic_cast<const QuantLinear*>(first.experts[0].gate_up.get());
  if (gu && gu->spec().quantize_weights) down.unit = std::lcm(down.unit, int64_t(gu->main().spec.row_group));
  intermediate_ = k_bounds(c.intermediate_size, down, world, down_where);
  for (size_t l = 0; l < model.layers().size(); ++l)
    for (size_t e = 0; e < model.layers()[l].experts.size(); ++e) {
      const std::string where = fmt::format("{}: layer {} down_proj{}", tp, l, e ? fmt::format(" expert {}", e) : "");
      const Linear& down = *model.layers()[l].experts[e].down;
      const auto* q = dynamic_cast<const QuantLinear*>(&down);
      check(!q || q->perm().empty(), where,
            "it gathers its input by a permutation: gate/up's rows must carry its channel order (as a packed "
            "file's do) for their rows and its columns to split alike");
      check(legal_bounds(intermediate_, k_split(down, where)), where,
            "its quantization groups differ from layer 0's; the intermediate channels cannot split alike");
    }

  // o_proj: each rank's own heads when its channels are in head order and the head boundaries are
  // group boundaries; else every rank gathers the attention output and takes whole groups.
  const int64_t qd = c.q_dim();
  std::vector<int64_t> heads(size_t(world) + 1);
  for (int r = 0; r <= world; ++r) heads[size_t(r)] = r * qd / world;
  const auto* q_o = dynamic_cast<const QuantLinear*>(first.o.get());
  const bool permuted = q_o && !q_o->perm().empty();
  for (size_t l = 0; l < model.layers().size(); ++l) {
    const std::string where = fmt::format("{}: layer {} o_proj", tp, l);
    const KSplit k = k_split(*model.layers()[l].o, where);
    if (l == 0) {
      gather_attention_ = world > 1 && (permuted || !legal_bounds(heads, k));
      o_ = gather_attention_ ? k_bounds(qd, k, world, where) : heads;
    }
    check(legal_bounds(o_, k), where, "its quantization groups differ from layer 0's; o_proj cannot split alike");
  }
}

std::vector<ChannelRange> ShardPlan::qkv_rows(int rank) const {
  const int64_t hd = config_.head_dim, qd = config_.q_dim(), kvd = config_.kv_dim();
  // With fewer KV heads than ranks, world / num_kv_heads neighbouring ranks read the same KV head.
  const int64_t kv0 = config_.num_kv_heads >= world_ ? rank * kv_heads_ : rank / (world_ / config_.num_kv_heads);
  const ChannelRange q{rank * heads_ * hd, (rank + 1) * heads_ * hd};
  const ChannelRange k{qd + kv0 * hd, qd + (kv0 + kv_heads_) * hd};
  return {q, k, {k.begin + kvd, k.end + kvd}};
}

ChannelRange ShardPlan::vocab(int rank) const {
  return {rank * vocab_per_rank_, std::min(config_.vocab_size, (rank + 1) * vocab_per_rank_)};
}

TensorParallelRank ShardPlan::placement(int rank, Communicator* comm) const {
  return {comm, vocab(rank).begin, vocab_per_rank_, gather_attention_};
}

std::unique_ptr<Model> shard_model(const Model& model, const ShardPlan& plan, int rank) {
  const ModelConfig& c = model.config();
  const int64_t H = c.hidden_size, I = c.intermediate_size, qd = c.q_dim();
  const ChannelRange mid = plan.intermediate(rank), o_cols = plan.o_columns(rank), vocab = plan.vocab(rank);
  const ChannelRange hidden{0, H};
  const bool first_rank = rank == 0;
  ModelConfig sc = c;
  sc.num_heads = plan.heads_per_rank();
  sc.num_kv_heads = plan.kv_heads_per_rank();
  sc.intermediate_size = mid.size();

  std::vector<Layer> layers;
  for (size_t l = 0; l < model.layers().size(); ++l) {
    const Layer& src = model.layers()[l];
    const std::string where = fmt::format("--tp {}: layer {} ", plan.world(), l);
    check(src.k_rotation.empty(), "--tp", "layer {} rotates K by a learned rotation (--kv-rotation learned-k), which "
          "has no tensor-parallel path; run it on one device", l);
    Layer dst;
    dst.attn_norm = src.attn_norm;
    dst.mlp_norm = src.mlp_norm;
    dst.qkv = cut(*src.qkv, plan.qkv_rows(rank), hidden, true, where + "qkv");
    dst.o = cut(*src.o, all_rows(*src.o), o_cols, first_rank, where + "o_proj");
    if (plan.gather_attention()) {
      const auto* q = dynamic_cast<const QuantLinear*>(src.o.get());
      std::vector<int32_t> channels(size_t(o_cols.size()));
      for (int64_t i = 0; i < o_cols.size(); ++i)
        channels[size_t(i)] = q && !q->perm().empty() ? q->perm()[size_t(o_cols.begin + i)] : int32_t(o_cols.begin + i);
      dst.o = std::make_unique<ChannelSubsetLinear>(qd, std::move(channels), std::move(dst.o));
    }
    if (src.router) dst.router = cut(*src.router, all_rows(*src.router), hidden, true, where + "router");
    for (size_t e = 0; e < src.experts.size(); ++e) {
      const Expert& ex = src.experts[e];
      const std::string en = src.router ? fmt::format(" expert {}", e) : "";
      const std::vector<ChannelRange> gate_and_up{mid, {I + mid.begin, I + mid.end}};
      dst.experts.push_back({cut(*ex.gate_up, gate_and_up, hidden, true, where + "gate/up" + en),
                             cut(*ex.down, all_rows(*ex.down), mid, first_rank, where + "down_proj" + en)});
    }
    layers.push_back(std::move(dst));
  }
  std::vector<float> embedding(model.embedding().begin() + vocab.begin * H, model.embedding().begin() + vocab.end * H);
  auto shard = std::make_unique<Model>(sc, model.source(), std::move(embedding), std::move(layers), model.final_norm(),
                                       cut(model.lm_head(), {vocab}, hidden, true, "--tp: lm_head"));
  shard->set_kv_format(model.kv_format());
  shard->set_fp16_activations(model.fp16_activations());
  shard->metadata() = model.metadata();
  return shard;
}

}  // namespace nibble
