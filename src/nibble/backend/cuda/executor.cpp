// The whole forward pass on one GPU: embedding, per layer RMSNorm → QKV → RoPE + paged KV write →
// attention (prefill or decode kernel) → O → residual → RMSNorm → gate/up → SwiGLU → down →
// residual, then the final norm and the LM head on the rows whose logits were asked for.
// Weights are uploaded once; buffers are sized once for opt.max_batch_tokens.
#include "nibble/backend/cuda/executor.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "nibble/backend/cpu/ops.h"
#include "nibble/backend/shard_plan.h"
#include "nibble/backend/cuda/atom_layout.h"
#include "nibble/backend/cuda/attention_common.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/device_array.h"
#include "nibble/backend/cuda/kv_cache_paged.h"
#include "nibble/backend/cuda/linear_fp16.h"
#include "nibble/backend/cuda/linear_w8a8.h"
#include "nibble/backend/cuda/gemm_w4a4.h"
#include "nibble/backend/cuda/model_kernels.h"
#include "nibble/backend/cuda/nccl_comm.h"
#include "nibble/backend/cuda/norm_quantize.h"
#include "nibble/backend/cuda/sampler.h"
#include "nibble/core/half.h"
#include "nibble/core/interrupt.h"
#include "nibble/model/model.h"
#include "nibble/quant/device_math.h"
#include "nibble/quant/quant_linear.h"

namespace nibble::cuda {

bool device_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    if (why)
      *why = e != cudaSuccess ? cformat("no usable CUDA device: {}", cudaGetErrorString(e)) : "no CUDA device found";
    return false;
  }
  return true;
}

namespace {

// One linear on the device, in one of three forms: FP16 weights for cuBLAS; W8A8, which takes the
// same fp16 input rows and quantizes them itself; or Atom's W4A4 operand (INT4 groups of 128 + INT8
// keepers, GPU layout) whose input is gathered by `perm` and quantized per token by the fused
// norm/quantize kernels.
struct LinearWeights {
  int64_t in = 0, out = 0;
  DeviceArray<__half> bias;  // [out] or empty (W8A8: its own)
  // FP16
  DeviceArray<__half> w;  // [out, in]
  // W8A8
  bool int8 = false;
  W8A8Weights w8a8;
  // W4A4
  bool atom = false;
  AtomDeviceMatrix atom_w;
  DeviceArray<int32_t> perm;     // [in] input channel of each permuted channel, or empty (identity)
  int64_t ld_in = 0;             // elements between input rows: `in`, or the gathered input's width
  DeviceArray<float> norm_perm;  // the RMSNorm weight feeding this linear, in permuted order
  ActQuant act;
  int keeper = 0;
};

LinearWeights upload_dense(const DenseLinear& l, const std::string& what) {
  LinearWeights w;
  w.in = l.in_features();
  w.out = l.out_features();
  w.w = upload_fp16(l.weight(), what);
  w.bias = upload_fp16(l.bias(), what + ".bias");
  return w;
}

// What gemm_w4a4 and its quantize kernels run: Atom's recipe without nibble's group rotation.
LinearWeights upload_atom(const quant::QuantLinear& q, const std::vector<float>* norm, const std::string& what) {
  using quant::Format;
  const quant::LinearQuantSpec& s = q.spec();
  const int64_t N = q.out_features(), K = q.in_features(), main = K - s.keeper;
  require(s.act && s.act->format == Format::Int4Sym && s.act->group == kGroup, what,
          "the GPU runs INT4 activations in groups of 128 only (this linear: {}); use --device cpu",
          s.act ? quant::format_name(s.act->format) : "full-precision activations");
  require((s.weight.format == Format::Int4Sym || s.weight.format == Format::Int4SymAtomGptq) &&
              s.weight.group == kGroup,
          what, "the GPU runs INT4 weights in groups of 128 only (this linear: {}, group {}); use --device cpu",
          quant::format_name(s.weight.format), s.weight.group);
  require(s.keeper == 0 || (s.keeper_precision == quant::KeeperPrecision::Int8 && q.keepers()), what,
          "the GPU runs INT8 keeper channels only (this linear: {}); use --device cpu",
          quant::keeper_precision_name(s.keeper_precision));
  const quant::QuantizedMatrix& m = q.main();
  AtomPackedHost p;
  p.shape = atom_shape(N, int(K), int(s.keeper));
  p.q4.resize(size_t(N * main / 2));
  quant::pack_4bit(m.spec.format, m.codes.data(), N * main, p.q4.data(), what);
  const int64_t groups = main / kGroup, row_group = m.spec.row_group;
  p.s4.resize(size_t(N * groups));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g)
      p.s4[size_t(n * groups + g)] = float_to_fp16(m.scales[size_t((n / row_group) * groups + g)]);
  if (s.keeper > 0) {
    const quant::QuantizedMatrix& k = *q.keepers();
    p.q8.assign(k.codes.begin(), k.codes.end());
    p.s8.resize(size_t(N));
    for (int64_t n = 0; n < N; ++n) p.s8[size_t(n)] = float_to_fp16(k.scales[size_t(n)]);
  }
  LinearWeights w;
  w.in = K;
  w.out = N;
  w.atom = true;
  w.atom_w = AtomDeviceMatrix(to_gpu_layout(p));
  w.keeper = int(s.keeper);
  w.act = ActQuant{s.act->clip, 1.0f, s.group_hadamard};
  w.bias = upload_fp16(q.bias(), what + ".bias");
  w.ld_in = K;
  if (!q.perm().empty()) w.perm = DeviceArray<int32_t>(q.perm().data(), q.perm().size());
  if (norm) {
    std::vector<float> np(static_cast<size_t>(K));
    for (int64_t j = 0; j < K; ++j) np[size_t(j)] = (*norm)[size_t(q.perm().empty() ? j : q.perm()[size_t(j)])];
    w.norm_perm = DeviceArray<float>(np.data(), np.size());
  }
  return w;
}

LinearWeights upload_int8(const quant::QuantLinear& q, const std::string& what) {
  LinearWeights w;
  w.in = q.in_features();
  w.out = q.out_features();
  w.int8 = true;
  w.w8a8 = upload_w8a8(q, what);
  return w;
}

// A weight-only linear (no activation quantizer, no rotation) as its dequantized weight in fp16,
// un-permuted: x · W[:, perm]ᵀ over permuted channels is x · Wdᵀ with Wd[:, perm[c]] = W[:, c].
// What the calibration stream runs for it; the executor keeps the packed weights and refuses it.
LinearWeights upload_dequantized(const quant::QuantLinear& q, const std::string& what) {
  const int64_t N = q.out_features(), K = q.in_features();
  const std::vector<float>& wq = q.dequantized();
  std::vector<float> w(wq.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K; ++c)
      w[size_t(n * K + (q.perm().empty() ? c : q.perm()[size_t(c)]))] = wq[size_t(n * K + c)];
  LinearWeights out;
  out.in = K;
  out.out = N;
  out.w = upload_fp16(w, what);
  out.bias = upload_fp16(q.bias(), what + ".bias");
  return out;
}

LinearWeights upload_linear(const Linear& l, const std::vector<float>* norm, const std::string& what,
                            bool dequantize_weight_only = false) {
  if (const auto* dense = dynamic_cast<const DenseLinear*>(&l)) return upload_dense(*dense, what);
  // A tensor-parallel o_proj shard: its permuted channels read from the gathered attention output.
  if (const auto* sub = dynamic_cast<const ChannelSubsetLinear*>(&l)) {
    const auto* q = dynamic_cast<const quant::QuantLinear*>(&sub->inner());
    require(q && q->spec().act && !is_w8a8(*q) && q->perm().empty(), what,
            "a gathered tensor-parallel shard has a CUDA kernel only in the W4A4 format; use --device cpu");
    LinearWeights w = upload_atom(*q, nullptr, what);
    w.perm = DeviceArray<int32_t>(sub->channels().data(), sub->channels().size());
    w.ld_in = sub->in_features();
    return w;
  }
  if (const auto* q = dynamic_cast<const quant::QuantLinear*>(&l)) {
    if (dequantize_weight_only && !q->spec().act && !q->spec().group_hadamard) return upload_dequantized(*q, what);
    return is_w8a8(*q) ? upload_int8(*q, what) : upload_atom(*q, norm, what);
  }
  throw Error(what, "this linear type has no CUDA kernel; use --device cpu");
}

struct ExpertWeights {
  LinearWeights gate_up, down;
};

struct LayerWeights {
  DeviceArray<float> attn_norm, mlp_norm;
  LinearWeights qkv, o;
  std::vector<ExpertWeights> experts;  // one for a dense MLP
  DeviceArray<float> router;           // Mixtral: [num_experts, hidden], fp32 (routing decisions are discrete)

  std::vector<const LinearWeights*> linears() const {
    std::vector<const LinearWeights*> all{&qkv, &o};
    for (const ExpertWeights& e : experts) all.insert(all.end(), {&e.gate_up, &e.down});
    return all;
  }
};

// Bytes the weights take on the device: fp16 for dense tensors, the W8A8 upload, the packed W4A4
// operand otherwise.
int64_t device_weight_bytes(const Model& m) {
  auto linear = [](const Linear& l) -> int64_t {
    if (const auto* q = dynamic_cast<const quant::QuantLinear*>(&l))
      return is_w8a8(*q) ? w8a8_device_bytes(*q) : l.storage_bytes();  // codes + scales
    return 2 * l.in_features() * l.out_features();
  };
  int64_t n = 2 * int64_t(m.embedding().size());
  for (const Layer& layer : m.layers()) {
    n += linear(*layer.qkv) + linear(*layer.o);
    if (layer.router) n += 4 * layer.router->in_features() * layer.router->out_features();  // held in fp32
    for (const Expert& e : layer.experts) n += linear(*e.gate_up) + linear(*e.down);
  }
  if (!m.config().tie_word_embeddings) n += linear(m.lm_head());
  return n;
}

// What the CUDA kernels need of a model's shape (the executor's and the calibration stream's check).
void check_layer_kernels(const ModelConfig& c) {
  require(c.num_experts <= kMaxExperts, "--device cuda", "the CUDA router takes at most {} experts; this model has {}",
          kMaxExperts, c.num_experts);
  require(c.head_dim == 64 || c.head_dim == 128, "--device cuda",
          "the CUDA attention kernels take head_dim 64 or 128; this model has {} (use --device cpu)", c.head_dim);
}

// Layer l's weights on the device. dequantize_weight_only: weight-only linears as their dequantized
// fp16 weights (the calibration stream's quantized pass; the executor refuses them).
LayerWeights upload_layer(const Layer& src, int l, bool dequantize_weight_only) {
  check_cuda_layer_support(src, l);
  const std::string p = cformat("model.layers.{}.", l);
  LayerWeights lw;
  lw.attn_norm = DeviceArray<float>(src.attn_norm.data(), src.attn_norm.size());
  lw.mlp_norm = DeviceArray<float>(src.mlp_norm.data(), src.mlp_norm.size());
  lw.qkv = upload_linear(*src.qkv, &src.attn_norm, p + "self_attn.qkv", dequantize_weight_only);
  lw.o = upload_linear(*src.o, nullptr, p + "self_attn.o_proj", dequantize_weight_only);
  const std::string mlp = src.router ? p + "block_sparse_moe." : p + "mlp.";
  for (size_t e = 0; e < src.experts.size(); ++e) {
    const std::string ex = src.router ? cformat("{}experts.{}.", mlp, e) : mlp;
    lw.experts.push_back(
        {upload_linear(*src.experts[e].gate_up, &src.mlp_norm, ex + "gate_up", dequantize_weight_only),
         upload_linear(*src.experts[e].down, nullptr, ex + "down_proj", dequantize_weight_only)});
  }
  if (src.router) {
    const auto* router = dynamic_cast<const DenseLinear*>(src.router.get());
    require(router != nullptr && router->bias().empty(), mlp + "gate",
            "a quantized router has no CUDA kernel; use --device cpu");
    lw.router = DeviceArray<float>(router->weight().data(), router->weight().size());
  }
  return lw;
}

// One decoder layer's kernels and what they run in: the activation buffers for up to max_tokens
// rows, cuBLAS, the W8A8 GEMM, the W4A4 operand and scratch, the RoPE table and the KV cache's
// quantization settings. The executor runs every layer of a step through it; the calibration
// stream (LayerStream) one layer over each window.
class LayerRunner {
 public:
  // `blas` is the owner's: created before the owner reads the free memory (see CudaExecutor::blas_).
  LayerRunner(const ModelConfig& c, LinearFp16& blas, int64_t max_tokens, int64_t max_context, cudaStream_t stream)
      : cfg_(c), max_tokens_(max_tokens), stream_(stream), blas_(blas) {
    blas_ws_ = DeviceArray<uint8_t>(size_t(32) << 20);  // NVIDIA's recommendation for Hopper
    NIBBLE_CUBLAS_CHECK(cublasSetWorkspace(blas_.handle(), blas_ws_.get(), blas_ws_.size()));
    rope_ = std::make_unique<RopeTable>(cpu::rope_inv_freq(c), int(max_context));
    const int64_t T = max_tokens, H = c.hidden_size, qkv = c.q_dim() + 2 * c.kv_dim();
    xn_ = DeviceArray<__half>(size_t(T * std::max(H, c.q_dim())));
    qkv_ = DeviceArray<__half>(size_t(T * qkv));
    q_rot_ = DeviceArray<__half>(size_t(T * c.q_dim()));
    attn_ = DeviceArray<__half>(size_t(T * c.q_dim()));
    y_ = DeviceArray<__half>(size_t(T * H));
    gate_up_ = DeviceArray<__half>(size_t(T * 2 * c.intermediate_size));
    act_ = DeviceArray<__half>(size_t(T * c.intermediate_size));
    if (c.num_experts > 0) expert_weights_ = DeviceArray<float>(size_t(T * c.num_experts));
  }

  // Readies what the linears of `w` need: the W8A8 GEMM's algorithms, and the W4A4 activation
  // operands and GEMM scratch big enough for any linear seen so far (grown, never shrunk), each
  // sized by the maximum over the linears of its own function: the packed operand and the split-K
  // sums for up to 64 rows (the decode and stream kernels) and, where steps can have kWgmmaMinM rows or
  // more, X pre-widened for the wgmma kernel (gemm_w4a4.h), which the quantizers write directly, and
  // the stream-K kernel's workspace.
  void prepare(const LayerWeights& w) {
    const int64_t T = max_tokens_;
    for (const LinearWeights* l : w.linears()) {
      if (l->int8) {
        if (!w8a8_) w8a8_ = std::make_unique<W8A8Gemm>(T);
        w8a8_->prepare(l->w8a8);
      }
      if (!l->atom) continue;
      // The fp16 residual only where several W4A4 linears read one norm (Mixtral's experts); a
      // dense layer's norm is fused into its linear's quantize kernel, which counts rows.
      if (w.experts.size() > 1 && !hidden16_.size()) hidden16_ = DeviceArray<__half>(size_t(T * cfg_.hidden_size));
      if (!row_counters_.size()) {
        row_counters_ = DeviceArray<int>(size_t(T));
        NIBBLE_CUDA_CHECK(cudaMemset(row_counters_.get(), 0, row_counters_.size() * sizeof(int)));  // kept zeroed
      }
      const AtomShape a = atom_shape(std::min<int64_t>(T, kDecodeMaxM), int(l->in), l->keeper);
      if (act_codes_.size() < size_t(a.code_bytes())) act_codes_ = DeviceArray<uint8_t>(size_t(a.code_bytes()));
      if (act_scales_.size() < size_t(a.scale_count())) act_scales_ = DeviceArray<__half>(size_t(a.scale_count()));
      size_t split_k = 16;
      for (int64_t m = 1; m <= std::min<int64_t>(T, kDecodeMaxM); ++m)
        split_k = std::max(split_k, gemm_w4a4_split_k_bytes(m, l->out, int(l->in), l->keeper));
      if (gemm_split_k_.size() < split_k) {
        gemm_split_k_ = DeviceArray<uint8_t>(split_k);
        NIBBLE_CUDA_CHECK(cudaMemset(gemm_split_k_.get(), 0, gemm_split_k_.size()));  // the kernels keep it zeroed
      }
      const size_t x_int8 = gemm_w4a4_takes_x_int8(T) ? gemm_w4a4_x_int8_bytes(T, int(l->in), l->keeper) : 0;
      if (act_x_int8_.size() < x_int8) act_x_int8_ = DeviceArray<uint8_t>(x_int8);
      // Stream-K (a path of the pre-widened entry): the bound over every shape, ~8.6 MB on an H200,
      // rather than each linear's plan at every row count up to T.
      const size_t stream_k = gemm_w4a4_takes_x_int8(T) ? gemm_w4a4_stream_k_bytes_bound() : 0;
      if (gemm_stream_k_.size() < stream_k) {
        gemm_stream_k_ = DeviceArray<uint8_t>(stream_k);
        NIBBLE_CUDA_CHECK(cudaMemset(gemm_stream_k_.get(), 0, gemm_stream_k_.size()));  // the kernel keeps its flags zero
      }
    }
  }

  // The paged-cache layout of `layers` layers in KV format `kvf`, whose quantization the layers'
  // attention will apply from now on. Throws for a format without a kernel.
  PagedKVLayout set_kv(const KVFormat& kvf, int layers) {
    require(kvf.bits == 4 || kvf.bits >= 16, "--device cuda",
            "the KV cache format {} has no CUDA kernel (the GPU keeps fp16 or INT4 K/V); use --device cpu or --kv-bits",
            kvf.describe());
    require(!(kvf.bits == 4 && kvf.hadamard && kvf.k_before_rope), "--device cuda",
            "a Hadamard-rotated KV cache with K stored before RoPE has no CUDA kernel (the attention kernels rotate "
            "K by RoPE as they read it); use --k-after-rope or --device cpu");
    PagedKVLayout layout;
    layout.num_layers = layers;
    layout.kv_heads = int(cfg_.num_kv_heads);
    layout.head_dim = int(cfg_.head_dim);
    layout.page_size = 16;
    layout.dtype = kvf.bits == 4 ? KVDtype::Int4 : KVDtype::Fp16;
    layout.validate("--device cuda");
    kv_clip_ = kvf.bits == 4 ? kvf.clip : 1.0f;
    k_before_rope_ = kvf.bits == 4 && kvf.k_before_rope;
    kv_hadamard_ = kvf.bits == 4 && kvf.hadamard;
    return layout;
  }
  bool k_before_rope() const { return k_before_rope_; }

  // Layer `w` on n rows of the fp32 residual `hidden`, its K/V in layer kv_layer of `view`
  // (attention by the decode kernel in `splits` splits, or prefill when 0). `pending` (the last
  // linear's output of the layer before, or null) is added first; on return it is this layer's,
  // which the next norm adds (add_pending alone at the end). observer: sees every dense linear's
  // input (dense layers only; no MoE); need_output false skips down_proj's product (hidden is
  // then not to be used).
  void layer(const LayerWeights& w, int kv_layer, const KVCacheView& view, const AttentionBatch& ab, int splits,
             int64_t n, float* hidden, const __half*& pending, const DeviceLinearObserver* observer = nullptr,
             bool need_output = true) {
    const ModelConfig& c = cfg_;
    const int64_t H = c.hidden_size, I = c.intermediate_size;
    const float eps = float(c.rms_norm_eps);
    auto observe = [&](LinearSlot slot, const __half* x, int64_t dim) {
      if (observer && *observer) (*observer)(slot, -1, DeviceRows{x, n, dim, stream_});
    };
    // The residual add of `pending`, then the RMSNorm the linears that follow take: fp16 normalized
    // rows in xn_ (FP16, W8A8, a router) and/or the fp16 residual in hidden16_, which Mixtral's W4A4
    // experts' kernels normalize, permute and quantize per linear (add_norm_linear, below, serves
    // a dense layer's one reader).
    auto add_and_norm = [&](const DeviceArray<float>& norm, bool rows16, bool atom) {
      residual_rmsnorm(hidden, pending, n, H, rows16 ? norm.get() : nullptr, eps, rows16 ? xn_.get() : nullptr,
                       atom ? hidden16_.get() : nullptr, stream_);
      pending = nullptr;
    };
    // y = w(the rows add_and_norm left).
    auto normed_linear = [&](const LinearWeights& lw, LinearSlot slot, __half* y) {
      if (!lw.atom) {
        observe(slot, xn_.get(), H);
        return dense(lw, xn_.get(), n, y);
      }
      rmsnorm_quantize(hidden16_.get(), H, lw.perm.get(), lw.norm_perm.get(), eps, act_op(n, lw), lw.act, stream_);
      w4a4(lw, n, y);
    };
    // add_and_norm then y = w(...) for the norm's only reader: a W4A4 linear takes the residual add
    // into its quantize kernel (one launch fewer, no fp16 copy of the residual).
    auto add_norm_linear = [&](const DeviceArray<float>& norm, const LinearWeights& lw, LinearSlot slot, __half* y) {
      if (!lw.atom) {
        add_and_norm(norm, true, false);
        return normed_linear(lw, slot, y);
      }
      residual_rmsnorm_quantize(hidden, pending, lw.perm.get(), lw.norm_perm.get(), eps, act_op(n, lw), lw.act,
                                row_counters_.get(), stream_);
      pending = nullptr;
      w4a4(lw, n, y);
    };
    // gate/up → SwiGLU → down into y_; `first` runs gate/up.
    auto expert_mlp = [&](const ExpertWeights& e, const auto& first) {
      first(e.gate_up, LinearSlot::GateUp, gate_up_.get());
      if (e.down.atom) {
        swiglu_quantize(gate_up_.get(), gate_up_.get() + I, 2 * I, e.down.perm.get(), act_op(n, e.down), e.down.act,
                        stream_);
        w4a4(e.down, n, y_.get());
      } else {
        swiglu(gate_up_.get(), n, I, act_.get(), stream_);
        observe(LinearSlot::Down, act_.get(), I);
        if (need_output) dense(e.down, act_.get(), n, y_.get());
      }
    };
    add_norm_linear(w.attn_norm, w.qkv, LinearSlot::QKV, qkv_.get());
    AppendArgs app;
    app.qkv = qkv_.get();
    app.qkv_stride = w.qkv.out;
    app.num_heads = int(c.num_heads);
    app.layer = kv_layer;
    app.rope = rope_.get();
    app.k_before_rope = k_before_rope_;
    app.clip = kv_clip_;
    app.hadamard = kv_hadamard_;
    app.q_out = q_rot_.get();
    attention_append(view, ab, app, stream_);
    AttentionArgs att;
    att.q = q_rot_.get();
    att.out = attn_.get();
    att.num_heads = int(c.num_heads);
    att.layer = kv_layer;
    att.rope = rope_.get();
    att.k_before_rope = k_before_rope_;
    att.num_splits = splits;
    if (splits > 0)
      attention_decode(view, ab, att, attn_ws_, stream_);
    else
      attention_prefill(view, ab, att, stream_);
    if (kv_hadamard_) hadamard_heads(attn_.get(), n * c.num_heads, int(c.head_dim), stream_);
    const __half* o_in = attn_.get();
    if (gather_attention_) {
      comm_->all_gather(attn_.get(), n * c.q_dim(), attn_parts_.get(), stream_);
      rank_columns(attn_parts_.get(), n, c.q_dim(), c.q_dim() * comm_->world(), attn_all_.get(), stream_);
      o_in = attn_all_.get();
    }
    if (w.o.atom) {
      gather_quantize(o_in, w.o.ld_in, w.o.perm.get(), act_op(n, w.o), w.o.act, stream_);
      w4a4(w.o, n, y_.get());
    } else {
      observe(LinearSlot::O, o_in, c.q_dim());
      dense(w.o, o_in, n, y_.get());
    }
    // Row-parallel: every rank's partial product summed (in fp16, as the product is stored).
    if (comm_) comm_->all_reduce_sum(y_.get(), n * H, stream_);
    pending = y_.get();
    if (w.experts.size() == 1) {
      expert_mlp(w.experts[0], [&](const LinearWeights& lw, LinearSlot slot, __half* y) {
        add_norm_linear(w.mlp_norm, lw, slot, y);
      });
      if (comm_) comm_->all_reduce_sum(y_.get(), n * H, stream_);
      pending = y_.get();
      return;
    }
    // Mixtral: every expert runs on every row and adds its output at the row's routing weight (0
    // where the row did not choose it): k/E of the work is wasted, but the step has no host
    // synchronisation, so it is captured like any other (MoE speed is not a target yet).
    bool any_atom = false, any_rows16 = false;
    for (const ExpertWeights& e : w.experts) (e.gate_up.atom ? any_atom : any_rows16) = true;
    add_and_norm(w.mlp_norm, any_rows16, any_atom);
    moe_route(hidden, n, H, w.mlp_norm.get(), eps, w.router.get(), int(c.num_experts), int(c.num_experts_per_tok),
              expert_weights_.get(), stream_);
    for (size_t e = 0; e < w.experts.size(); ++e) {
      expert_mlp(w.experts[e], normed_linear);
      add_expert_output(hidden, y_.get(), expert_weights_.get(), int(c.num_experts), int(e), n, H, stream_);
    }
  }

  // Makes the layers those of a tensor-parallel rank: o_proj and down_proj outputs all-reduced over
  // `comm`, and with gather_attention o_proj reading every rank's attention output (q_dim·world wide).
  void set_tensor_parallel(NcclComm* comm, bool gather_attention) {
    comm_ = comm;
    gather_attention_ = gather_attention;
    if (!gather_attention) return;
    const int64_t all = max_tokens_ * cfg_.q_dim() * comm->world();
    attn_parts_ = DeviceArray<__half>(size_t(all));
    attn_all_ = DeviceArray<__half>(size_t(all));
  }

  void reserve_decode_workspace(size_t bytes) { attn_ws_.reserve(bytes); }
  __half* xn() const { return xn_.get(); }
  __half* y() const { return y_.get(); }

 private:
  // y = linear(x) for a linear that takes fp16 input rows: FP16 (cuBLAS) or W8A8.
  void dense(const LinearWeights& w, const __half* x, int64_t rows, __half* y) {
    if (w.int8) {
      w8a8_->run(w.w8a8, x, rows, y, stream_);
      return;
    }
    blas_.run(x, w.w.get(), y, rows, w.out, w.in, stream_);
    if (w.bias.size()) add_bias(y, w.bias.get(), rows, w.out, stream_);
  }
  // Where a W4A4 linear's quantized input goes: pre-widened where gemm_w4a4's kernel for `rows`
  // reads that (no repack), else packed.
  ActOutput act_op(int64_t rows, const LinearWeights& w) const {
    const AtomShape shape = atom_shape(rows, int(w.in), w.keeper);
    if (gemm_w4a4_takes_x_int8(rows)) return ActOutput::pre_widened(act_x_int8_.get(), shape);
    return AtomOperandMut{act_codes_.get(), act_scales_.get(), shape};
  }
  // y = linear(quantized input) for a W4A4 linear whose input was quantized into act_op(rows, w).
  void w4a4(const LinearWeights& w, int64_t rows, __half* y) {
    const ActOutput x = act_op(rows, w);
    if (x.x_int8) {
      GemmW4A4Scratch scratch;
      scratch.stream_k = gemm_stream_k_.get();
      scratch.stream_k_bytes = gemm_stream_k_.size();
      gemm_w4a4(x.x_int8_operand(), w.atom_w.view(), y, OutType::F16, stream_, GemmPath::Auto, scratch);
    } else {
      const GemmW4A4Scratch scratch{gemm_split_k_.get(), gemm_split_k_.size()};
      gemm_w4a4(x.packed, w.atom_w.view(), y, OutType::F16, scratch, stream_);
    }
    if (w.bias.size()) add_bias(y, w.bias.get(), rows, w.out, stream_);
  }

  ModelConfig cfg_;
  int64_t max_tokens_;
  cudaStream_t stream_;
  LinearFp16& blas_;
  DeviceArray<uint8_t> blas_ws_;  // cuBLAS's workspace, set once (a captured GEMM may not allocate one)
  std::unique_ptr<W8A8Gemm> w8a8_;  // when any linear is W8A8
  std::unique_ptr<RopeTable> rope_;
  AttentionWorkspace attn_ws_;
  DeviceArray<__half> xn_, qkv_, q_rot_, attn_, y_, gate_up_, act_;
  DeviceArray<float> expert_weights_;  // Mixtral: [rows, num_experts]
  NcclComm* comm_ = nullptr;           // a tensor-parallel rank's; null: the whole model
  bool gather_attention_ = false;
  DeviceArray<__half> attn_parts_, attn_all_;  // gather_attention: every rank's attention output
  // W4A4 only: the fp16 copy of the residual stream, the quantized input (packed below kWgmmaMinM
  // rows, pre-widened from there), the decode kernel's split-K scratch.
  DeviceArray<__half> hidden16_;
  DeviceArray<int> row_counters_;  // residual_rmsnorm_quantize's, one per token row
  DeviceArray<uint8_t> act_codes_;  // the largest linear input at min(max_tokens, 64) rows
  DeviceArray<__half> act_scales_;
  DeviceArray<uint8_t> act_x_int8_;  // the largest linear input at max_tokens (>= kWgmmaMinM) rows, pre-widened
  DeviceArray<uint8_t> gemm_split_k_;  // zeroed once, left zeroed by the kernels
  DeviceArray<uint8_t> gemm_stream_k_;  // max_tokens >= kWgmmaMinM; zeroed once, the stream-K kernel leaves its flags zero
  float kv_clip_ = 1.0f;
  bool k_before_rope_ = false;
  bool kv_hadamard_ = false;
};

// The paged KV cache behind the KVPool seam. One page is set aside for the padding rows of a
// captured decode step (a batch padded to its graph's size): they write and read only there.
class PagedPool final : public KVPool {
 public:
  PagedPool(const PagedKVLayout& layout, int64_t pages, int gpu)
      : cache_(layout, pages), pad_page_(cache_.allocator().set_aside_page()), gpu_(gpu) {}
  SeqId add() override { return cache_.add_sequence(); }
  SeqId fork(SeqId seq) override { return cache_.fork(seq); }
  bool reserve(SeqId seq, int64_t n_new) override {
    NIBBLE_CUDA_CHECK(cudaSetDevice(gpu_));  // its copy-on-write copies (a tensor-parallel group calls from one thread)
    return cache_.reserve(seq, n_new);
  }
  void truncate(SeqId seq, int64_t n) override { cache_.truncate(seq, n); }
  void free(SeqId seq) override { cache_.free_sequence(seq); }
  int64_t length(SeqId seq) const override { return cache_.length(seq); }
  int64_t capacity_tokens() const override {
    return (cache_.allocator().num_pages() - 1) * cache_.layout().page_size;
  }
  int64_t free_tokens() const override { return cache_.free_pages() * cache_.layout().page_size; }
  PagedKVCache& cache() { return cache_; }
  int32_t pad_page() const { return pad_page_; }

 private:
  PagedKVCache cache_;
  int32_t pad_page_;
  int gpu_;
};

// A step ready to launch: its batch metadata uploaded, its sizes (padded to the graph's batch
// when it is replayed as a graph).
struct StepPlan {
  AttentionBatch ab;
  int64_t n = 0;          // token rows through the layers
  int64_t rows = 0;       // rows the LM head computes
  int64_t real_rows = 0;  // of which the caller's (the rest are padding)
  int splits = 0;         // decode: attention splits; 0: prefill kernel
  int graph_batch = 0;    // > 0: a decode step padded to this batch size (its graph's)
};

// The graph batch sizes (vLLM's): 1, 2, 4, then multiples of 8.
int64_t graph_batch_for(int64_t b) { return b <= 2 ? b : b <= 4 ? 4 : (b + 7) / 8 * 8; }

class CudaExecutor final : public Executor {
 public:
  // On GPU `gpu`; with `comm`, the tensor-parallel rank comm->rank() of the shard `model`
  // (backend/shard_plan.h; its TensorParallelRank gives the vocabulary slice and the o_proj gather).
  CudaExecutor(const Model& model, const RuntimeOptions& opt, int gpu = 0, std::unique_ptr<NcclComm> comm = nullptr);
  ~CudaExecutor() override;
  const ModelConfig& config() const override { return cfg_; }
  KVPool& kv() override { return *pool_; }
  std::string device_name() const override { return device_name_; }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override;
  void forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) override;
  void forward_sample(std::span<const BatchEntry> batch, std::span<const RowSampling> rows, SampledRows& out) override;

 private:
  // Checks the batch, appends its tokens to the pool (every sequence rolled back when one does not
  // fit), pads a decode batch to its graph size and uploads tokens, head rows and attention metadata.
  StepPlan prepare(std::span<const BatchEntry> batch);
  // Every kernel of the step, embedding to LM head, and nothing else: no allocation, copy or
  // synchronisation, so that it can be captured.
  void launch(const StepPlan& plan);
  // launch, or the plan's decode graph (captured on its second use: the first runs eagerly and sets
  // the kernels' attributes and cuBLAS's choices up outside a capture).
  void run(const StepPlan& plan);
  // Greedy ids of the caller's rows (and their logits when asked) to the host; one synchronisation;
  // a non-finite logit is an error.
  void finish(const StepPlan& plan, std::vector<float>* logits, std::vector<int32_t>& ids);

  // Runs step() (launch and finish) after prepare: a failure then leaves the other ranks of a
  // tensor-parallel group in a collective, so the group is aborted.
  template <typename Step>
  void after_prepare(Step&& step) {
    try {
      step();
    } catch (...) {
      if (comm_) comm_->abort();
      throw;
    }
  }

  ModelConfig cfg_;
  std::string device_name_;
  int gpu_ = 0;
  std::unique_ptr<NcclComm> comm_;
  int64_t vocab_first_ = 0, embedding_rows_ = 0;  // the embedding rows this executor holds
  int64_t head_width_ = 0;                        // rows of its LM head (a rank's slice, padded)
  DeviceArray<float> logits_part_, logits_ranks_;  // tensor parallel: this rank's slice, every rank's
  int64_t max_tokens_, max_context_;
  int64_t max_graph_batch_ = 0;  // decode batches up to this size are padded to a graph batch
  bool use_graphs_ = true;       // and replayed as graphs (else launched kernel by kernel)
  cudaStream_t stream_ = nullptr;
  // cuBLAS's handle, made on gpu_ before the constructor reads the free memory, so that --gpu-mem-gb
  // caps what nibble allocates (weights, buffers, KV pages), not the library's own context.
  std::unique_ptr<LinearFp16> blas_;
  std::unique_ptr<LayerRunner> runner_;
  DeviceArray<__half> embedding_, lm_head_own_;
  const __half* lm_head_ = nullptr;  // the embedding when tied
  DeviceArray<float> final_norm_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<PagedPool> pool_;
  std::unique_ptr<AttentionBatchBuilder> batch_builder_;
  std::unique_ptr<DeviceSampler> sampler_;
  struct Graph {
    bool warmed = false;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<std::pair<int64_t, int>, Graph> graphs_;  // by (graph batch, attention splits)
  // Pinned host staging: tokens and head rows up, greedy ids and the non-finite flag down.
  int32_t* host_io_ = nullptr;
  // Activations for max_tokens_ rows.
  DeviceArray<int32_t> tokens_, head_rows_, ids_;
  DeviceArray<float> hidden_, logits_;
};

CudaExecutor::~CudaExecutor() {
  cudaSetDevice(gpu_);
  for (auto& [key, g] : graphs_)
    if (g.exec) cudaGraphExecDestroy(g.exec);
  if (host_io_) cudaFreeHost(host_io_);
  if (stream_) cudaStreamDestroy(stream_);
}

CudaExecutor::CudaExecutor(const Model& model, const RuntimeOptions& opt, int gpu, std::unique_ptr<NcclComm> comm)
    : cfg_(model.config()),
      gpu_(gpu),
      comm_(std::move(comm)),
      max_tokens_(opt.max_batch_tokens),
      max_context_(opt.max_context > 0 ? std::min(opt.max_context, cfg_.max_position_embeddings)
                                       : cfg_.max_position_embeddings) {
  const ModelConfig& c = cfg_;
  const KVFormat& kvf = model.kv_format();
  check_layer_kernels(c);
  require(max_tokens_ >= 1, "--device cuda", "max_batch_tokens must be >= 1, not {}", max_tokens_);
  require(!comm_ || c.num_experts == 0, "--tp", "a mixture of experts under tensor parallelism has no CUDA path yet; "
          "use --device cpu");
  NIBBLE_CUDA_CHECK(cudaSetDevice(gpu_));
  blas_ = std::make_unique<LinearFp16>();
  cudaDeviceProp prop{};
  NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, gpu_));
  device_name_ = cformat("cuda:{} ({})", gpu_, prop.name);
  // The weights as they will sit on the device (fp16, or the packed W4A4 bytes) against what is free
  // and what --gpu-mem-gb allows, before anything is allocated.
  size_t free0 = 0, total = 0;
  NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free0, &total));
  const double weights_gb = double(device_weight_bytes(model)) / 1e9;
  const double cap_gb = opt.gpu_mem_gb > 0 ? std::min(opt.gpu_mem_gb, double(free0) / 1e9) : double(free0) / 1e9;
  require(weights_gb < cap_gb, "--device cuda", "the weights need {:.2f} GB on the GPU; {:.2f} GB {}", weights_gb,
          cap_gb, opt.gpu_mem_gb > 0 && opt.gpu_mem_gb * 1e9 < double(free0) ? "allowed by --gpu-mem-gb" : "free");
  NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

  embedding_ = upload_fp16(model.embedding(), "model.embed_tokens.weight");
  vocab_first_ = model.tensor_parallel().vocab_begin;
  embedding_rows_ = int64_t(model.embedding().size()) / c.hidden_size;
  final_norm_ = DeviceArray<float>(model.final_norm().data(), model.final_norm().size());
  const auto* head = dynamic_cast<const DenseLinear*>(&model.lm_head());
  require(head != nullptr, "lm_head", "a quantized LM head has no CUDA kernel yet; use --device cpu");
  head_width_ = comm_ ? model.tensor_parallel().vocab_per_rank : c.vocab_size;
  if (comm_) {
    // Every rank's slice as wide as the first's (zero rows past the vocabulary): equal all-gathers.
    std::vector<float> padded(head->weight());
    padded.resize(size_t(head_width_ * c.hidden_size), 0.0f);
    lm_head_own_ = upload_fp16(padded, "lm_head.weight");
    lm_head_ = lm_head_own_.get();
  } else if (c.tie_word_embeddings && head->weight() == model.embedding()) {
    lm_head_ = embedding_.get();
  } else {
    lm_head_own_ = upload_fp16(head->weight(), "lm_head.weight");
    lm_head_ = lm_head_own_.get();
  }
  runner_ = std::make_unique<LayerRunner>(c, *blas_, max_tokens_, max_context_, stream_);
  if (comm_) runner_->set_tensor_parallel(comm_.get(), model.tensor_parallel().gather_attention);
  for (size_t l = 0; l < model.layers().size(); ++l) {
    layers_.push_back(upload_layer(model.layers()[l], int(l), false));
    runner_->prepare(layers_.back());
  }

  const int64_t T = max_tokens_, H = c.hidden_size;
  tokens_ = DeviceArray<int32_t>(size_t(T));
  head_rows_ = DeviceArray<int32_t>(size_t(T));
  ids_ = DeviceArray<int32_t>(size_t(T) + 1);  // + the non-finite flag
  NIBBLE_CUDA_CHECK(cudaMallocHost(&host_io_, (2 * size_t(T) + 1) * sizeof(int32_t)));
  hidden_ = DeviceArray<float>(size_t(T * H));
  logits_ = DeviceArray<float>(size_t(T * c.vocab_size));
  if (comm_) {
    logits_part_ = DeviceArray<float>(size_t(T * head_width_));
    logits_ranks_ = DeviceArray<float>(size_t(T * head_width_ * comm_->world()));
  }

  const PagedKVLayout layout = runner_->set_kv(kvf, int(c.num_layers));
  const int max_blocks = int((max_context_ + layout.page_size - 1) / layout.page_size);
  batch_builder_ = std::make_unique<AttentionBatchBuilder>(int(T), T, max_blocks);
  KVCacheView shape;  // what the decode workspace bound depends on
  shape.kv_heads = layout.kv_heads;
  shape.head_dim = layout.head_dim;
  shape.dtype = layout.dtype;
  runner_->reserve_decode_workspace(attention_decode_workspace_bytes(shape, int(c.num_heads), runner_->k_before_rope()));
  max_graph_batch_ = std::min<int64_t>(T, 512);
  sampler_ = std::make_unique<DeviceSampler>(T, c.vocab_size);
  use_graphs_ = opt.cuda_graphs;
  int64_t pages = opt.kv_pages;
  if (pages == 0 && opt.gpu_mem_gb > 0) {
    // What is left of the cap after the weights and buffers allocated so far.
    size_t free_now = 0;
    NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free_now, &total));
    const double left = opt.gpu_mem_gb * 1e9 - double(free0 - free_now);
    pages = left <= 0 ? 0 : std::min(int64_t(left / double(layout.page_bytes())),
                                     PagedKVCache::pages_for_free_memory(layout, 1.0, 0));
  } else if (pages == 0) {
    pages = PagedKVCache::pages_for_free_memory(layout, opt.gpu_mem_fraction, 0);
  }
  // One page goes to the padding rows of captured steps (PagedPool).
  require((pages - 1) * layout.page_size >= max_context_, "--device cuda",
          "the KV pool holds {} tokens ({} pages of {}, one kept back), less than one sequence of {} tokens: free "
          "GPU memory or lower --ctx",
          std::max<int64_t>(pages - 1, 0) * layout.page_size, pages, layout.page_size, max_context_);
  pool_ = std::make_unique<PagedPool>(layout, pages, gpu_);
}

StepPlan CudaExecutor::prepare(std::span<const BatchEntry> batch) {
  const ModelConfig& c = cfg_;
  // The captured steps hold the communicator's kernels: after an abort none may run again.
  require(!comm_ || !comm_->aborted(), "--tp", "a step failed on rank {} of this tensor-parallel group and aborted "
          "its NCCL communicator; the group cannot run another step (restart nibble)", comm_ ? comm_->rank() : 0);
  PagedKVCache& cache = pool_->cache();
  std::vector<int32_t> tokens, head_rows;
  std::vector<SeqId> seqs;
  std::vector<int> news;
  for (const BatchEntry& e : batch) {
    require(!e.tokens.empty(), "forward", "sequence {} has no new tokens", e.seq);
    require(cache.allocator().alive(e.seq), "forward", "no live sequence {}", e.seq);
    const int64_t len = cache.length(e.seq) + int64_t(e.tokens.size());
    require(len <= max_context_, "forward", "sequence {} would hold {} tokens, past the context of {}", e.seq, len,
            max_context_);
    require(c.sliding_window == 0 || len <= c.sliding_window, "forward",
            "sliding-window attention has no CUDA kernel yet: sequence {} reaches {} tokens, past the window of {}",
            e.seq, len, c.sliding_window);
    for (size_t i = 0; i < e.tokens.size(); ++i) {
      require(e.tokens[i] >= 0 && e.tokens[i] < c.vocab_size, "forward",
              "token id {} at position {} is outside the vocabulary (0..{})", e.tokens[i], i, c.vocab_size - 1);
      if (e.all_logits || i + 1 == e.tokens.size()) head_rows.push_back(int32_t(tokens.size() + i));
    }
    tokens.insert(tokens.end(), e.tokens.begin(), e.tokens.end());
    seqs.push_back(e.seq);
    news.push_back(int(e.tokens.size()));
  }
  // Each sequence once (sorted, not pairwise: a decode step may carry hundreds).
  std::vector<SeqId> sorted = seqs;
  std::sort(sorted.begin(), sorted.end());
  const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
  require(twice == sorted.end(), "forward", "sequence {} appears twice", twice == sorted.end() ? -1 : *twice);
  StepPlan plan;
  plan.n = int64_t(tokens.size());
  plan.rows = plan.real_rows = int64_t(head_rows.size());
  require(plan.n <= max_tokens_, "forward", "{} tokens in one step, more than the {} the buffers were sized for",
          plan.n, max_tokens_);
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (cache.append(seqs[i], news[i], stream_)) continue;
    for (size_t j = 0; j < i; ++j) cache.truncate(seqs[j], cache.length(seqs[j]) - news[j]);
    throw Error("forward", cformat("the KV pool is full ({} tokens free, the step needs {})", pool_->free_tokens(),
                                   plan.n));
  }
  const bool decode = plan.n == int64_t(seqs.size());
  // Padding rows (token 0 on the set-aside page): their logits are computed and ignored.
  if (decode && graph_batch_for(plan.n) <= max_graph_batch_) plan.graph_batch = int(graph_batch_for(plan.n));
  for (int64_t i = plan.n; i < plan.graph_batch; ++i) {
    tokens.push_back(0);
    head_rows.push_back(int32_t(i));
  }
  if (plan.graph_batch > 0) plan.n = plan.rows = plan.graph_batch;
  std::copy(tokens.begin(), tokens.end(), host_io_);
  std::copy(head_rows.begin(), head_rows.end(), host_io_ + plan.n);
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(tokens_.get(), host_io_, size_t(plan.n) * 4, cudaMemcpyHostToDevice, stream_));
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(head_rows_.get(), host_io_ + plan.n, size_t(plan.rows) * 4,
                                    cudaMemcpyHostToDevice, stream_));
  plan.ab = batch_builder_->build(cache.allocator(), seqs, news, stream_, plan.graph_batch, pool_->pad_page());
  if (decode) plan.splits = attention_decode_splits(cache.view(), plan.ab, int(cfg_.num_heads), runner_->k_before_rope());
  return plan;
}

void CudaExecutor::launch(const StepPlan& plan) {
  const ModelConfig& c = cfg_;
  const KVCacheView view = pool_->cache().view();
  const int64_t n = plan.n, H = c.hidden_size;
  embed_rows(tokens_.get(), n, embedding_.get(), vocab_first_, embedding_rows_, H, hidden_.get(), stream_);
  if (comm_) comm_->all_reduce_sum(hidden_.get(), n * H, stream_);  // one rank's row per token: exact
  const __half* pending = nullptr;  // the last linear's output, added to the residual by the next norm
  for (size_t l = 0; l < layers_.size(); ++l)
    runner_->layer(layers_[l], int(l), view, plan.ab, plan.splits, n, hidden_.get(), pending);
  __half* xn = runner_->xn();
  residual_rmsnorm(hidden_.get(), pending, n, H, final_norm_.get(), float(c.rms_norm_eps), xn, nullptr, stream_);
  // The LM head on the selected rows only, fp32 logits: Logitsᵀ [V, rows] = E [V, H] · Xᵀ.
  __half* selected = runner_->y();  // consumed by the norm above: free again
  gather_rows(xn, head_rows_.get(), plan.rows, H, selected, stream_);
  if (!comm_) return blas_->run(selected, lm_head_, logits_.get(), plan.rows, c.vocab_size, H, stream_);
  // Vocabulary-parallel: this rank's slice of every row, gathered from every rank into logits_.
  blas_->run(selected, lm_head_, logits_part_.get(), plan.rows, head_width_, H, stream_);
  comm_->all_gather(logits_part_.get(), plan.rows * head_width_, logits_ranks_.get(), stream_);
  rank_columns(logits_ranks_.get(), plan.rows, head_width_, c.vocab_size, logits_.get(), stream_);
}

void CudaExecutor::run(const StepPlan& plan) {
  if (plan.graph_batch == 0 || !use_graphs_) return launch(plan);
  Graph& g = graphs_[{plan.graph_batch, plan.splits}];
  if (!g.exec) {
    if (!g.warmed) {
      g.warmed = true;
      return launch(plan);
    }
    cudaGraph_t graph = nullptr;
    NIBBLE_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      launch(plan);
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);  // leaves the stream usable; the error is the launch's
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    NIBBLE_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    const cudaError_t e = cudaGraphInstantiate(&g.exec, graph, 0);
    cudaGraphDestroy(graph);
    NIBBLE_CUDA_CHECK(e);
  }
  NIBBLE_CUDA_CHECK(cudaGraphLaunch(g.exec, stream_));
}

void CudaExecutor::finish(const StepPlan& plan, std::vector<float>* logits, std::vector<int32_t>& ids) {
  const int64_t V = cfg_.vocab_size, rows = plan.real_rows;
  int32_t* flag = ids_.get() + max_tokens_;
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(flag, 0, sizeof(int32_t), stream_));
  argmax_rows(logits_.get(), rows, V, ids_.get(), flag, stream_);
  if (logits) {
    logits->resize(size_t(rows * V));
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(logits->data(), logits_.get(), logits->size() * 4, cudaMemcpyDeviceToHost,
                                      stream_));
  }
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(host_io_, ids_.get(), size_t(rows) * 4, cudaMemcpyDeviceToHost, stream_));
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(host_io_ + rows, flag, 4, cudaMemcpyDeviceToHost, stream_));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  require(host_io_[rows] == 0, "forward",
          "a non-finite logit (an fp16 activation overflowed on the GPU?); use --device cpu");
  ids.assign(host_io_, host_io_ + rows);
}

void CudaExecutor::forward(std::span<const BatchEntry> batch, std::vector<float>& logits) {
  logits.clear();
  if (batch.empty()) return;
  NIBBLE_CUDA_CHECK(cudaSetDevice(gpu_));
  const StepPlan plan = prepare(batch);
  after_prepare([&] {
    run(plan);
    std::vector<int32_t> ids;
    finish(plan, &logits, ids);
  });
}

void CudaExecutor::forward_greedy(std::span<const BatchEntry> batch, std::vector<int32_t>& ids) {
  ids.clear();
  if (batch.empty()) return;
  NIBBLE_CUDA_CHECK(cudaSetDevice(gpu_));
  const StepPlan plan = prepare(batch);
  after_prepare([&] {
    run(plan);
    finish(plan, nullptr, ids);
  });
}

void CudaExecutor::forward_sample(std::span<const BatchEntry> batch, std::span<const RowSampling> rows,
                                  SampledRows& out) {
  int64_t logits_rows = 0;
  for (const BatchEntry& e : batch) logits_rows += e.all_logits ? int64_t(e.tokens.size()) : 1;
  require(int64_t(rows.size()) == logits_rows, "forward_sample", "{} sampling rows for {} rows of logits", rows.size(),
          logits_rows);
  out.resize(0, 0);
  if (batch.empty()) return;
  NIBBLE_CUDA_CHECK(cudaSetDevice(gpu_));
  const StepPlan plan = prepare(batch);
  after_prepare([&] {
    run(plan);
    std::vector<int32_t> greedy;
    finish(plan, nullptr, greedy);  // refuses non-finite logits
    sampler_->sample(logits_.get(), rows, stream_, out);
  });
}

// The calibration windows' hidden states on the device (LayerStream): one fp32 array of
// windows × ctx × hidden, each window run through a layer as one prefill of ctx tokens (positions
// 0..ctx-1) in a one-layer paged cache, as Model::run_layer runs it with a fresh cache.
class CudaLayerStream final : public LayerStream {
 public:
  CudaLayerStream(const ModelConfig& c, int64_t windows, int64_t ctx) : cfg_(c), windows_(windows), ctx_(ctx) {
    check_layer_kernels(c);
    require(c.num_experts == 0, "--device cuda",
            "a mixture of experts' calibration forward has no device path (the device's MoE runs every expert on "
            "every row; the statistics need the routed rows)");
    const int64_t H = c.hidden_size;
    size_t free = 0, total = 0;
    NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free, &total));
    const double stream_gb = double(windows * ctx * H) * 4 / 1e9;
    require(stream_gb < 0.5 * double(free) / 1e9, "--device cuda",
            "the calibration stream ({} windows of {} tokens, fp32) needs {:.2f} GB on the GPU, more than half of "
            "the {:.2f} GB free; lower --calib-windows",
            windows, ctx, stream_gb, double(free) / 1e9);
    NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    runner_ = std::make_unique<LayerRunner>(c, blas_, ctx, ctx, stream_);
    hidden_ = DeviceArray<float>(size_t(windows * ctx * H));
    scratch_ = DeviceArray<float>(size_t(ctx * H));
    builder_ = std::make_unique<AttentionBatchBuilder>(1, ctx, int(pages_per_window()));
  }
  ~CudaLayerStream() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  void set_window(int64_t w, const float* hidden) override {
    NIBBLE_CUDA_CHECK(cudaMemcpy(window(w), hidden, window_bytes(), cudaMemcpyHostToDevice));
  }
  void read_window(int64_t w, float* hidden) const override {
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    NIBBLE_CUDA_CHECK(cudaMemcpy(hidden, window(w), window_bytes(), cudaMemcpyDeviceToHost));
  }

  void load_layer(const Model& model, int l) override {
    layer_.reset();
    const PagedKVLayout layout = runner_->set_kv(model.kv_format(), 1);
    layer_ = std::make_unique<LayerWeights>(upload_layer(model.layers()[size_t(l)], l, true));
    layer_index_ = l;
    runner_->prepare(*layer_);
    if (!cache_ || cache_->layout().dtype != layout.dtype) {
      cache_.reset();
      cache_ = std::make_unique<PagedKVCache>(layout, pages_per_window());
    }
  }

  void run(bool advance, const DeviceLinearObserver& observer) override {
    require(layer_ != nullptr, "calibration stream", "no layer loaded");
    const LayerWeights& w = *layer_;
    const int64_t H = cfg_.hidden_size;
    for (int64_t win = 0; win < windows_; ++win) {
      throw_if_interrupted(cformat("layer {}", layer_index_));
      // Observing leaves the stream as it was (observe_layer): the layer runs on a copy.
      float* h = window(win);
      if (!advance) {
        NIBBLE_CUDA_CHECK(cudaMemcpyAsync(scratch_.get(), h, window_bytes(), cudaMemcpyDeviceToDevice, stream_));
        h = scratch_.get();
      }
      const SeqId seq = cache_->add_sequence();
      require(cache_->append(seq, ctx_, stream_), "--device cuda", "the calibration window's KV cache is full");
      const SeqId seqs[] = {seq};
      const int news[] = {int(ctx_)};
      const AttentionBatch ab = builder_->build(cache_->allocator(), seqs, news, stream_);
      const __half* pending = nullptr;
      runner_->layer(w, 0, cache_->view(), ab, 0, ctx_, h, pending, &observer, advance);
      if (advance) residual_rmsnorm(h, pending, ctx_, H, nullptr, 0.0f, nullptr, nullptr, stream_);
      // The batch builder's staging and the cache's pages are reused by the next window.
      NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
      cache_->free_sequence(seq);
    }
    quant::note_device_memory();
  }

 private:
  int64_t pages_per_window() const { return (ctx_ + 15) / 16; }
  float* window(int64_t w) const {
    require(w >= 0 && w < windows_, "calibration stream", "window {} of {}", w, windows_);
    return hidden_.get() + w * ctx_ * cfg_.hidden_size;
  }
  size_t window_bytes() const { return size_t(ctx_ * cfg_.hidden_size) * sizeof(float); }

  ModelConfig cfg_;
  int64_t windows_, ctx_;
  cudaStream_t stream_ = nullptr;
  LinearFp16 blas_;
  std::unique_ptr<LayerRunner> runner_;
  DeviceArray<float> hidden_, scratch_;
  std::unique_ptr<AttentionBatchBuilder> builder_;
  std::unique_ptr<PagedKVCache> cache_;
  std::unique_ptr<LayerWeights> layer_;
  int layer_index_ = -1;
};

}  // namespace

std::unique_ptr<Executor> make_executor(const Model& model, const RuntimeOptions& opt) {
  return std::make_unique<CudaExecutor>(model, opt);
}

std::vector<std::unique_ptr<Executor>> make_tensor_parallel_ranks(
    int world, const std::function<std::unique_ptr<Model>(int rank)>& shard, const RuntimeOptions& opt) {
  std::vector<std::unique_ptr<NcclComm>> comms = NcclComm::create_all(world);
  std::vector<std::unique_ptr<Executor>> ranks;
  RuntimeOptions rank_opt = opt;
  for (int r = 0; r < world; ++r) {
    ranks.push_back(std::make_unique<CudaExecutor>(*shard(r), rank_opt, r, std::move(comms[size_t(r)])));
    // Every rank's pool as large as rank 0's (sized from its free memory), so that the same calls
    // give the same pages on each.
    rank_opt.kv_pages = ranks[0]->kv().capacity_tokens() / kKVPageTokens + 1;  // + the padding rows' page
  }
  return ranks;
}

std::unique_ptr<LayerStream> make_layer_stream(const ModelConfig& c, int64_t windows, int64_t ctx) {
  return std::make_unique<CudaLayerStream>(c, windows, ctx);
}

}  // namespace nibble::cuda
