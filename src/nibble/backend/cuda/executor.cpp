// The whole forward pass on one GPU: embedding, per layer RMSNorm → QKV → RoPE + paged KV write →
// attention (prefill or decode kernel) → O → residual → RMSNorm → gate/up → SwiGLU → down →
// residual, then the final norm and the LM head on the rows whose logits were asked for.
// Weights are uploaded once; buffers are sized once for opt.max_batch_tokens.
#include "nibble/backend/cuda/executor.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "nibble/backend/cpu/ops.h"
#include "nibble/backend/cuda/attention_common.h"
#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/backend/cuda/kv_cache_paged.h"
#include "nibble/backend/cuda/linear_fp16.h"
#include "nibble/backend/cuda/model_kernels.h"
#include "nibble/core/half.h"
#include "nibble/model/model.h"

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

// One cudaMalloc'd array, freed with its owner.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n) NIBBLE_CUDA_CHECK(cudaMalloc(&p_, n * sizeof(T)));
  }
  DeviceArray(const T* host, size_t n) : DeviceArray(n) {
    if (n) NIBBLE_CUDA_CHECK(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// fp32 host values as a device fp16 array; values past fp16's range are refused, naming the tensor.
DeviceArray<__half> upload_fp16(const std::vector<float>& v, const std::string& what) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    require(std::fabs(v[i]) <= 65504.0f, what, "value {} at element {} does not fit fp16", v[i], i);
    bits[i] = float_to_fp16(v[i]);
  }
  return DeviceArray<__half>(reinterpret_cast<const __half*>(bits.data()), bits.size());
}

struct DenseWeights {
  DeviceArray<__half> w, b;  // [out, in], bias [out] or empty
  int64_t in = 0, out = 0;
};

DenseWeights upload_linear(const Linear& l, const std::string& what) {
  const auto* dense = dynamic_cast<const DenseLinear*>(&l);
  require(dense != nullptr, what,
          "this quantized linear format has no CUDA kernel yet (the GPU runs FP16 checkpoints); use --device cpu");
  return {upload_fp16(dense->weight(), what), upload_fp16(dense->bias(), what + ".bias"), l.in_features(),
          l.out_features()};
}

struct LayerWeights {
  DeviceArray<float> attn_norm, mlp_norm;
  DenseWeights qkv, o, gate_up, down;
};

class PagedPool final : public KVPool {
 public:
  PagedPool(const PagedKVLayout& layout, int64_t pages) : cache_(layout, pages) {}
  SeqId add() override { return cache_.add_sequence(); }
  SeqId fork(SeqId seq) override { return cache_.fork(seq); }
  void truncate(SeqId seq, int64_t n) override { cache_.truncate(seq, n); }
  void free(SeqId seq) override { cache_.free_sequence(seq); }
  int64_t length(SeqId seq) const override { return cache_.length(seq); }
  int64_t capacity_tokens() const override { return cache_.allocator().num_pages() * cache_.layout().page_size; }
  int64_t free_tokens() const override { return cache_.free_pages() * cache_.layout().page_size; }
  PagedKVCache& cache() { return cache_; }

 private:
  PagedKVCache cache_;
};

class CudaExecutor final : public Executor {
 public:
  CudaExecutor(const Model& model, const RuntimeOptions& opt);
  ~CudaExecutor() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  const ModelConfig& config() const override { return cfg_; }
  KVPool& kv() override { return *pool_; }
  std::string device_name() const override { return device_name_; }
  void forward(std::span<const BatchEntry> batch, std::vector<float>& logits) override;

 private:
  void linear(const DenseWeights& w, const __half* x, int64_t rows, __half* y);

  ModelConfig cfg_;
  std::string device_name_;
  int64_t max_tokens_, max_context_;
  cudaStream_t stream_ = nullptr;
  LinearFp16 blas_;
  DeviceArray<__half> embedding_, lm_head_own_;
  const __half* lm_head_ = nullptr;  // the embedding when tied
  DeviceArray<float> final_norm_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<RopeTable> rope_;
  std::unique_ptr<PagedPool> pool_;
  AttentionBatchBuilder batch_builder_;
  AttentionWorkspace attn_ws_;
  // Activations for max_tokens_ rows.
  DeviceArray<int32_t> tokens_, head_rows_;
  DeviceArray<float> hidden_, logits_;
  DeviceArray<__half> xn_, qkv_, q_rot_, attn_, y_, gate_up_, act_;
};

CudaExecutor::CudaExecutor(const Model& model, const RuntimeOptions& opt)
    : cfg_(model.config()),
      max_tokens_(opt.max_batch_tokens),
      max_context_(opt.max_context > 0 ? std::min(opt.max_context, cfg_.max_position_embeddings)
                                       : cfg_.max_position_embeddings) {
  const ModelConfig& c = cfg_;
  require(c.num_experts == 0, "--device cuda", "{} (mixture of experts) has no CUDA forward pass yet; use --device cpu",
          arch_name(c.arch));
  require(c.head_dim == 64 || c.head_dim == 128, "--device cuda",
          "the CUDA attention kernels take head_dim 64 or 128; this model has {} (use --device cpu)", c.head_dim);
  require(!model.fp16_activations(), "--device cuda",
          "fp16-rounded activations (--atom-compat's simulation) run on the CPU only");
  require(model.kv_format().bits >= 16, "--device cuda",
          "the model's KV cache format ({}) has no CUDA kernel wired yet; use --device cpu or --kv-bits 16",
          model.kv_format().describe());
  require(max_tokens_ >= 1, "--device cuda", "max_batch_tokens must be >= 1, not {}", max_tokens_);
  cudaDeviceProp prop{};
  NIBBLE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  device_name_ = cformat("cuda:0 ({})", prop.name);
  NIBBLE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

  embedding_ = upload_fp16(model.embedding(), "model.embed_tokens.weight");
  final_norm_ = DeviceArray<float>(model.final_norm().data(), model.final_norm().size());
  const auto* head = dynamic_cast<const DenseLinear*>(&model.lm_head());
  require(head != nullptr, "lm_head", "a quantized LM head has no CUDA kernel yet; use --device cpu");
  if (c.tie_word_embeddings && head->weight() == model.embedding()) {
    lm_head_ = embedding_.get();
  } else {
    lm_head_own_ = upload_fp16(head->weight(), "lm_head.weight");
    lm_head_ = lm_head_own_.get();
  }
  for (size_t l = 0; l < model.layers().size(); ++l) {
    const Layer& src = model.layers()[l];
    const std::string p = cformat("model.layers.{}.", l);
    LayerWeights lw;
    lw.attn_norm = DeviceArray<float>(src.attn_norm.data(), src.attn_norm.size());
    lw.mlp_norm = DeviceArray<float>(src.mlp_norm.data(), src.mlp_norm.size());
    lw.qkv = upload_linear(*src.qkv, p + "self_attn.qkv");
    lw.o = upload_linear(*src.o, p + "self_attn.o_proj");
    lw.gate_up = upload_linear(*src.experts[0].gate_up, p + "mlp.gate_up");
    lw.down = upload_linear(*src.experts[0].down, p + "mlp.down_proj");
    layers_.push_back(std::move(lw));
  }
  rope_ = std::make_unique<RopeTable>(cpu::rope_inv_freq(c), int(max_context_));

  const int64_t T = max_tokens_, H = c.hidden_size, qkv = c.q_dim() + 2 * c.kv_dim();
  tokens_ = DeviceArray<int32_t>(size_t(T));
  head_rows_ = DeviceArray<int32_t>(size_t(T));
  hidden_ = DeviceArray<float>(size_t(T * H));
  logits_ = DeviceArray<float>(size_t(T * c.vocab_size));
  xn_ = DeviceArray<__half>(size_t(T * std::max(H, c.q_dim())));
  qkv_ = DeviceArray<__half>(size_t(T * qkv));
  q_rot_ = DeviceArray<__half>(size_t(T * c.q_dim()));
  attn_ = DeviceArray<__half>(size_t(T * c.q_dim()));
  y_ = DeviceArray<__half>(size_t(T * H));
  gate_up_ = DeviceArray<__half>(size_t(T * 2 * c.intermediate_size));
  act_ = DeviceArray<__half>(size_t(T * c.intermediate_size));

  PagedKVLayout layout;
  layout.num_layers = int(c.num_layers);
  layout.kv_heads = int(c.num_kv_heads);
  layout.head_dim = int(c.head_dim);
  layout.page_size = 16;
  layout.dtype = KVDtype::Fp16;
  layout.validate("--device cuda");
  const int64_t pages = opt.kv_pages > 0 ? opt.kv_pages
                                         : PagedKVCache::pages_for_free_memory(layout, opt.gpu_mem_fraction, 0);
  require(pages * layout.page_size >= max_context_, "--device cuda",
          "the KV pool holds {} tokens ({} pages of {}), less than one sequence of {} tokens: free GPU memory or "
          "lower --ctx",
          pages * layout.page_size, pages, layout.page_size, max_context_);
  pool_ = std::make_unique<PagedPool>(layout, pages);
}

void CudaExecutor::linear(const DenseWeights& w, const __half* x, int64_t rows, __half* y) {
  blas_.run(x, w.w.get(), y, rows, w.out, w.in, stream_);
  if (w.b.size()) add_bias(y, w.b.get(), rows, w.out, stream_);
}

void CudaExecutor::forward(std::span<const BatchEntry> batch, std::vector<float>& logits) {
  const ModelConfig& c = cfg_;
  PagedKVCache& cache = pool_->cache();
  std::vector<int32_t> tokens, head_rows;
  std::vector<SeqId> seqs;
  std::vector<int> news;
  for (const BatchEntry& e : batch) {
    require(!e.tokens.empty(), "forward", "sequence {} has no new tokens", e.seq);
    require(cache.allocator().alive(e.seq), "forward", "no live sequence {}", e.seq);
    require(std::find(seqs.begin(), seqs.end(), e.seq) == seqs.end(), "forward", "sequence {} appears twice",
            e.seq);
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
  const int64_t n = int64_t(tokens.size()), rows = int64_t(head_rows.size());
  require(n <= max_tokens_, "forward", "{} tokens in one step, more than the {} the buffers were sized for", n,
          max_tokens_);
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (cache.append(seqs[i], news[i], stream_)) continue;
    for (size_t j = 0; j < i; ++j) cache.truncate(seqs[j], cache.length(seqs[j]) - news[j]);
    throw Error("forward", cformat("the KV pool is full ({} tokens free, the step needs {})",
                                   pool_->free_tokens(), n));
  }

  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(tokens_.get(), tokens.data(), size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
  NIBBLE_CUDA_CHECK(
      cudaMemcpyAsync(head_rows_.get(), head_rows.data(), size_t(rows) * 4, cudaMemcpyHostToDevice, stream_));
  const AttentionBatch ab = batch_builder_.build(cache.allocator(), seqs, news, stream_);
  const KVCacheView view = cache.view();
  const bool decode = ab.max_new == 1;

  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const float eps = float(c.rms_norm_eps);
  embed_rows(tokens_.get(), n, embedding_.get(), H, hidden_.get(), stream_);
  const __half* pending = nullptr;  // the last linear's output, added to the residual by the next norm
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerWeights& w = layers_[l];
    residual_rmsnorm(hidden_.get(), pending, n, H, w.attn_norm.get(), eps, xn_.get(), stream_);
    linear(w.qkv, xn_.get(), n, qkv_.get());
    AppendArgs app;
    app.qkv = qkv_.get();
    app.qkv_stride = w.qkv.out;
    app.num_heads = int(c.num_heads);
    app.layer = int(l);
    app.rope = rope_.get();
    app.q_out = q_rot_.get();
    attention_append(view, ab, app, stream_);
    AttentionArgs att;
    att.q = q_rot_.get();
    att.out = attn_.get();
    att.num_heads = int(c.num_heads);
    att.layer = int(l);
    att.rope = rope_.get();
    if (decode)
      attention_decode(view, ab, att, attn_ws_, stream_);
    else
      attention_prefill(view, ab, att, stream_);
    linear(w.o, attn_.get(), n, y_.get());
    residual_rmsnorm(hidden_.get(), y_.get(), n, H, w.mlp_norm.get(), eps, xn_.get(), stream_);
    linear(w.gate_up, xn_.get(), n, gate_up_.get());
    swiglu(gate_up_.get(), n, I, act_.get(), stream_);
    linear(w.down, act_.get(), n, y_.get());
    pending = y_.get();
  }
  residual_rmsnorm(hidden_.get(), pending, n, H, final_norm_.get(), eps, xn_.get(), stream_);
  // The LM head on the selected rows only, fp32 logits: Logitsᵀ [V, rows] = E [V, H] · Xᵀ.
  __half* selected = y_.get();  // consumed by the norm above: free again
  gather_rows(xn_.get(), head_rows_.get(), rows, H, selected, stream_);
  const float alpha = 1.0f, beta = 0.0f;
  NIBBLE_CUBLAS_CHECK(cublasSetStream(blas_.handle(), stream_));
  NIBBLE_CUBLAS_CHECK(cublasGemmEx(blas_.handle(), CUBLAS_OP_T, CUBLAS_OP_N, int(c.vocab_size), int(rows), int(H),
                                   &alpha, lm_head_, CUDA_R_16F, int(H), selected, CUDA_R_16F, int(H), &beta,
                                   logits_.get(), CUDA_R_32F, int(c.vocab_size), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
  logits.resize(size_t(rows * c.vocab_size));
  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(logits.data(), logits_.get(), logits.size() * 4, cudaMemcpyDeviceToHost,
                                    stream_));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream_));
  for (size_t i = 0; i < logits.size(); ++i)
    require(std::isfinite(logits[i]), "forward",
            "non-finite logit at row {} (an fp16 activation overflowed on the GPU?); use --device cpu",
            i / size_t(c.vocab_size));
}

}  // namespace

std::unique_ptr<Executor> make_executor(const Model& model, const RuntimeOptions& opt) {
  return std::make_unique<CudaExecutor>(model, opt);
}

}  // namespace nibble::cuda
