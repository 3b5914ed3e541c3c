#include "nibble/backend/cuda/kv_cache_paged.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {

const char* kv_dtype_name(KVDtype d) { return d == KVDtype::Int4 ? "int4" : "fp16"; }

void PagedKVLayout::validate(const std::string& where) const {
  require(num_layers >= 1 && kv_heads >= 1, where, "KV cache needs >= 1 layer and KV head, not {} and {}",
          num_layers, kv_heads);
  require(head_dim == 64 || head_dim == 128, where, "KV cache head_dim must be 64 or 128, not {}", head_dim);
  require(page_size >= 16 && page_size <= 256 && (page_size & (page_size - 1)) == 0, where,
          "KV cache page size must be a power of two from 16 to 256, not {}", page_size);
}

// ---- PageAllocator ---------------------------------------------------------------------------

PageAllocator::PageAllocator(int64_t num_pages, int page_size) : page_size_(page_size) {
  require(num_pages >= 0 && num_pages < (int64_t(1) << 31), "PageAllocator", "bad page count {}", num_pages);
  require(page_size > 0, "PageAllocator", "bad page size {}", page_size);
  refcount_.assign(size_t(num_pages), 0);
  free_.resize(size_t(num_pages));
  // Stack: page 0 is taken first.
  for (int64_t i = 0; i < num_pages; ++i) free_[size_t(i)] = int32_t(num_pages - 1 - i);
}

const PageAllocator::Seq& PageAllocator::get(SeqId seq) const {
  require(seq >= 0 && size_t(seq) < seqs_.size() && seqs_[size_t(seq)].alive, "PageAllocator",
          "no live sequence {}", seq);
  return seqs_[size_t(seq)];
}
PageAllocator::Seq& PageAllocator::get(SeqId seq) {
  return const_cast<Seq&>(static_cast<const PageAllocator*>(this)->get(seq));
}

bool PageAllocator::alive(SeqId seq) const {
  return seq >= 0 && size_t(seq) < seqs_.size() && seqs_[size_t(seq)].alive;
}
int64_t PageAllocator::length(SeqId seq) const { return get(seq).length; }
const std::vector<int32_t>& PageAllocator::block_table(SeqId seq) const { return get(seq).pages; }

SeqId PageAllocator::add_sequence() {
  SeqId id;
  if (!free_ids_.empty()) {
    id = free_ids_.back();
    free_ids_.pop_back();
  } else {
    id = SeqId(seqs_.size());
    seqs_.emplace_back();
  }
  seqs_[size_t(id)] = Seq{true, 0, {}};
  return id;
}

int32_t PageAllocator::take_page() {
  const int32_t p = free_.back();
  free_.pop_back();
  refcount_[size_t(p)] = 1;
  return p;
}

int32_t PageAllocator::set_aside_page() {
  require(!free_.empty(), "kv pool", "no free page to set aside");
  return take_page();
}

void PageAllocator::release_page(int32_t page) {
  if (--refcount_[size_t(page)] == 0) free_.push_back(page);
}

int64_t PageAllocator::pages_needed(SeqId seq, int64_t n) const {
  const Seq& s = get(seq);
  if (n <= 0) return 0;
  const int64_t have = int64_t(s.pages.size());
  const int64_t need = (s.length + n + page_size_ - 1) / page_size_;
  int64_t shared = 0;
  for (int64_t i = s.length / page_size_; i < std::min(have, need); ++i)
    if (refcount_[size_t(s.pages[size_t(i)])] > 1) ++shared;
  return std::max<int64_t>(need - have, 0) + shared;
}

bool PageAllocator::reserve(SeqId seq, int64_t n, std::vector<PageCopy>* copies) {
  require(n >= 0, "PageAllocator", "reserve of {} tokens", n);
  if (pages_needed(seq, n) > free_pages()) return false;
  Seq& s = get(seq);
  if (n == 0) return true;
  const int64_t have = int64_t(s.pages.size());
  const int64_t need = (s.length + n + page_size_ - 1) / page_size_;
  for (int64_t i = s.length / page_size_; i < std::min(have, need); ++i) {
    int32_t& p = s.pages[size_t(i)];
    if (refcount_[size_t(p)] > 1) {
      const int32_t fresh = take_page();
      if (copies) copies->push_back({p, fresh});
      release_page(p);
      p = fresh;
    }
  }
  for (int64_t i = have; i < need; ++i) s.pages.push_back(take_page());
  return true;
}

bool PageAllocator::append(SeqId seq, int64_t n, std::vector<PageCopy>* copies) {
  if (!reserve(seq, n, copies)) return false;
  get(seq).length += n;
  return true;
}

SeqId PageAllocator::fork(SeqId seq) {
  get(seq);  // validates
  const SeqId id = add_sequence();
  Seq& src = seqs_[size_t(seq)];  // add_sequence may have reallocated seqs_
  Seq& dst = seqs_[size_t(id)];
  dst.length = src.length;
  dst.pages.assign(src.pages.begin(), src.pages.begin() + (src.length + page_size_ - 1) / page_size_);
  for (int32_t p : dst.pages) ++refcount_[size_t(p)];
  return id;
}

void PageAllocator::truncate(SeqId seq, int64_t n) {
  Seq& s = get(seq);
  require(n >= 0 && n <= s.length, "PageAllocator", "truncate to {} of a sequence of {} tokens", n, s.length);
  const size_t keep = size_t((n + page_size_ - 1) / page_size_);
  for (size_t i = keep; i < s.pages.size(); ++i) release_page(s.pages[i]);
  s.pages.resize(keep);
  s.length = n;
}

void PageAllocator::free_sequence(SeqId seq) {
  truncate(seq, 0);
  seqs_[size_t(seq)].alive = false;
  free_ids_.push_back(seq);
}

// ---- PagedKVCache ----------------------------------------------------------------------------

PagedKVCache::PagedKVCache(const PagedKVLayout& layout, int64_t num_pages)
    : layout_(layout), alloc_(num_pages, layout.page_size) {
  layout_.validate("PagedKVCache");
  require(num_pages >= 1, "PagedKVCache", "the KV cache pool needs at least one page (got {})", num_pages);
  NIBBLE_CUDA_CHECK(cudaMalloc(&pool_, size_t(num_pages * layout_.page_bytes())));
}

PagedKVCache::~PagedKVCache() {
  if (pool_) cudaFree(pool_);
}

int64_t PagedKVCache::pages_for_free_memory(const PagedKVLayout& layout, double fraction, int64_t reserve_bytes) {
  require(fraction > 0 && fraction <= 1, "PagedKVCache", "--gpu-mem-fraction must be in (0, 1], not {}", fraction);
  size_t free_b = 0, total_b = 0;
  NIBBLE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const double usable = double(free_b) * fraction - double(reserve_bytes);
  return usable <= 0 ? 0 : int64_t(usable / double(layout.page_bytes()));
}

KVCacheView PagedKVCache::view() const {
  KVCacheView v;
  v.pool = pool_;
  v.num_pages = alloc_.num_pages();
  v.block_bytes = layout_.block_bytes();
  v.kv_heads = layout_.kv_heads;
  v.head_dim = layout_.head_dim;
  v.page_size = layout_.page_size;
  while ((1 << v.page_shift) < v.page_size) ++v.page_shift;
  v.dtype = layout_.dtype;
  return v;
}

void PagedKVCache::copy_page(int32_t src, int32_t dst, Stream stream) {
  // One page of one layer is kv_heads contiguous blocks; layers are num_pages pages apart.
  const size_t width = size_t(layout_.block_bytes() * layout_.kv_heads);
  const size_t pitch = width * size_t(alloc_.num_pages());
  NIBBLE_CUDA_CHECK(cudaMemcpy2DAsync(pool_ + size_t(dst) * width, pitch, pool_ + size_t(src) * width, pitch, width,
                                      size_t(layout_.num_layers), cudaMemcpyDeviceToDevice, stream));
}

bool PagedKVCache::reserve(SeqId seq, int64_t n) {
  std::vector<PageCopy> copies;
  if (!alloc_.reserve(seq, n, &copies)) return false;
  for (const PageCopy& c : copies) copy_page(c.src, c.dst, nullptr);
  if (!copies.empty()) NIBBLE_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  return true;
}

bool PagedKVCache::append(SeqId seq, int64_t n, Stream stream) {
  std::vector<PageCopy> copies;
  if (!alloc_.append(seq, n, &copies)) return false;
  for (const PageCopy& c : copies) copy_page(c.src, c.dst, stream);
  return true;
}

// ---- Host block helpers ----------------------------------------------------------------------

namespace {
// Dim held by nibble n of a word (see the header).
constexpr int nibble_dim(int n) { return n < 4 ? 2 * n : 2 * (n - 4) + 1; }
}  // namespace

void pack_int4_row(const uint8_t* codes, int head_dim, uint8_t* row) {
  for (int w = 0; w < head_dim / 8; ++w) {
    uint32_t word = 0;
    for (int n = 0; n < 8; ++n) word |= uint32_t(codes[8 * w + nibble_dim(n)] & 0xF) << (4 * n);
    for (int b = 0; b < 4; ++b) row[4 * w + b] = uint8_t(word >> (8 * b));
  }
}

void unpack_int4_row(const uint8_t* row, int head_dim, uint8_t* codes) {
  for (int w = 0; w < head_dim / 8; ++w) {
    uint32_t word = 0;
    for (int b = 0; b < 4; ++b) word |= uint32_t(row[4 * w + b]) << (8 * b);
    for (int n = 0; n < 8; ++n) codes[8 * w + nibble_dim(n)] = uint8_t((word >> (4 * n)) & 0xF);
  }
}

}  // namespace nibble::cuda
