// The paged KV cache on the device: one preallocated pool of fixed-size pages (default 16 tokens),
// a block table per sequence, allocation / free / fork (copy-on-write, reference counted), and an
// out-of-pages signal (a false return value, never an exception or a crash) for the scheduler.
//
// Pool layout: [layer][page][kv_head][block], one block = one page of one KV head of one layer,
// block_bytes() long (a multiple of 16). A sequence's block table lists its pages in order; token
// `pos` lives in page table[pos / page_size], row pos % page_size, in every layer.
//
// Block layout (P = page_size, a power of two >= 16; D = head_dim): P/16 chunks of 16 tokens, each
// chunk contiguous (one cp.async stream of 16-byte copies, coalesced, fetches it whole):
//   Fp16 chunk:  K [16][D] fp16, V [16][D] fp16                                   (64·D bytes)
//   Int4 chunk:  K codes [16][D/2], V codes [16][D/2], K scales [16] fp16,
//                V scales [16] fp16, K zeros [16] u8, V zeros [16] u8              (16·D + 96 bytes)
// The INT4 codes are format.h's Int4Asym codes (group = D, one fp16 scale + u8 zero per token and
// head: choose_scale / int_asym_encode), but their nibble order inside each 32-bit word differs from
// pack_4bit: word w of a row holds dims 8w..8w+7 with nibble n (bits 4n..4n+3) holding dim
//   8w + 2n       for n < 4,
//   8w + 2(n-4)+1 for n >= 4,
// so that (word >> 4i) & 0x000F000F puts dims (2i, 2i+1) into the two halves of a register: one
// LOP3 turns them into an fp16 pair (the 0x6400 = 1024.0 trick), in natural order.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "nibble/quant/format.h"

struct CUstream_st;

namespace nibble::cuda {

using Stream = CUstream_st*;

enum class KVDtype : uint8_t { Fp16, Int4 };
const char* kv_dtype_name(KVDtype d);

#if defined(__CUDACC__)
#define NIBBLE_HD __host__ __device__
#else
#define NIBBLE_HD
#endif

// One 16-token chunk of one KV head: 16 K rows, 16 V rows, then (INT4) their fp16 scales and u8
// zeros; a constant expression so that kernels can size their tiles with it.
NIBBLE_HD constexpr int64_t kv_chunk_bytes(int head_dim, KVDtype dtype) {
  return dtype == KVDtype::Int4 ? 16 * head_dim + 96 : 64 * head_dim;
}

struct PagedKVLayout {
  int num_layers = 1;
  int kv_heads = 1;
  int head_dim = 128;  // 64 or 128
  int page_size = 16;  // a power of two, 16..256
  KVDtype dtype = KVDtype::Int4;

  void validate(const std::string& where) const;  // throws nibble::Error
  NIBBLE_HD int64_t row_bytes() const { return dtype == KVDtype::Int4 ? head_dim / 2 : head_dim * 2; }
  NIBBLE_HD int64_t chunk_bytes() const { return kv_chunk_bytes(head_dim, dtype); }
  NIBBLE_HD int64_t block_bytes() const { return page_size / 16 * chunk_bytes(); }
  // Byte offsets inside a block of token row r (0 <= r < page_size).
  NIBBLE_HD int64_t chunk_offset(int r) const { return int64_t(r / 16) * chunk_bytes(); }
  NIBBLE_HD int64_t k_row_offset(int r) const { return chunk_offset(r) + (r % 16) * row_bytes(); }
  NIBBLE_HD int64_t v_row_offset(int r) const { return k_row_offset(r) + 16 * row_bytes(); }
  NIBBLE_HD int64_t k_scale_offset(int r) const { return chunk_offset(r) + 32 * row_bytes() + 2 * (r % 16); }
  NIBBLE_HD int64_t v_scale_offset(int r) const { return k_scale_offset(r) + 32; }
  NIBBLE_HD int64_t k_zero_offset(int r) const { return chunk_offset(r) + 32 * row_bytes() + 64 + r % 16; }
  NIBBLE_HD int64_t v_zero_offset(int r) const { return k_zero_offset(r) + 16; }
  // One page of every layer and KV head: the unit the pool is counted in.
  int64_t page_bytes() const { return block_bytes() * kv_heads * num_layers; }
  // Bytes the decode kernel reads per cached token, per layer (all KV heads).
  int64_t token_bytes_per_layer() const { return block_bytes() * kv_heads / page_size; }
};

// What kernels need to find a block; plain data, passed by value.
struct KVCacheView {
  uint8_t* pool = nullptr;
  int64_t num_pages = 0;
  int64_t block_bytes = 0;
  int kv_heads = 0, head_dim = 0, page_size = 0, page_shift = 0;  // page_size = 1 << page_shift
  KVDtype dtype = KVDtype::Int4;
};

// ---- Host bookkeeping (no device memory; testable without a GPU) -----------------------------

using SeqId = int32_t;

// A page copy the caller must perform before writing (copy-on-write of a shared page).
struct PageCopy {
  int32_t src, dst;
};

class PageAllocator {
 public:
  PageAllocator(int64_t num_pages, int page_size);

  int64_t num_pages() const { return int64_t(refcount_.size()); }
  int64_t free_pages() const { return int64_t(free_.size()); }
  int page_size() const { return page_size_; }

  SeqId add_sequence();  // empty, length 0
  // Grows `seq` by n tokens: allocates the pages the new tokens need, and copies (appends to
  // *copies; the caller copies the data) every page the new tokens land in that is shared with a
  // fork. Returns false, changing nothing, when the free pages do not suffice: the scheduler's
  // out-of-pages signal (preempt or wait; never a crash).
  [[nodiscard]] bool append(SeqId seq, int64_t n, std::vector<PageCopy>* copies);
  // Pages `append(seq, n)` would take from the free list (new + copied-on-write).
  int64_t pages_needed(SeqId seq, int64_t n) const;
  // Makes the pages of positions length..length+n-1 present and owned by seq alone, as append
  // does, but leaves the length: the next append of up to n tokens takes no page and cannot fail.
  // False, changing nothing, when the free pages do not suffice. truncate/free release the pages.
  [[nodiscard]] bool reserve(SeqId seq, int64_t n, std::vector<PageCopy>* copies);
  // A new sequence sharing the pages of `seq`'s tokens (reference counted; written pages are copied
  // first); pages seq holds only as a reservation stay its own.
  SeqId fork(SeqId seq);
  // Drops tokens from position n on, freeing pages no longer used.
  void truncate(SeqId seq, int64_t n);
  void free_sequence(SeqId seq);
  // Takes a free page out of use for good (no sequence will get it): the padding rows of a
  // captured decode step write and read there. Throws when no page is free.
  int32_t set_aside_page();

  bool alive(SeqId seq) const;
  int64_t length(SeqId seq) const;
  const std::vector<int32_t>& block_table(SeqId seq) const;
  int refcount(int32_t page) const { return refcount_[size_t(page)]; }

 private:
  struct Seq {
    bool alive = false;
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  const Seq& get(SeqId seq) const;
  Seq& get(SeqId seq);
  int32_t take_page();
  void release_page(int32_t page);

  int page_size_;
  std::vector<int32_t> free_;  // a stack: the most recently freed page is reused first
  std::vector<int> refcount_;
  std::vector<Seq> seqs_;
  std::vector<SeqId> free_ids_;
};

// ---- The device cache ------------------------------------------------------------------------

class PagedKVCache {
 public:
  // `num_pages` pages of layout.page_bytes() each, in one cudaMalloc.
  PagedKVCache(const PagedKVLayout& layout, int64_t num_pages);
  ~PagedKVCache();
  PagedKVCache(const PagedKVCache&) = delete;
  PagedKVCache& operator=(const PagedKVCache&) = delete;

  // Pages that fit in `fraction` of the device memory free now, after `reserve_bytes` are kept
  // back for activations and workspaces (the --gpu-mem-fraction rule).
  static int64_t pages_for_free_memory(const PagedKVLayout& layout, double fraction, int64_t reserve_bytes = 0);

  const PagedKVLayout& layout() const { return layout_; }
  KVCacheView view() const;
  PageAllocator& allocator() { return alloc_; }
  const PageAllocator& allocator() const { return alloc_; }
  int64_t pool_bytes() const { return int64_t(alloc_.num_pages()) * layout_.page_bytes(); }

  SeqId add_sequence() { return alloc_.add_sequence(); }
  // PageAllocator::append plus the copy-on-write copies, queued on `stream`. False: out of pages.
  [[nodiscard]] bool append(SeqId seq, int64_t n, Stream stream = nullptr);
  // PageAllocator::reserve plus its copy-on-write copies, done before it returns: reservations are
  // made between steps, when no kernel of the executor's stream touches the pool.
  [[nodiscard]] bool reserve(SeqId seq, int64_t n);
  SeqId fork(SeqId seq) { return alloc_.fork(seq); }
  void free_sequence(SeqId seq) { alloc_.free_sequence(seq); }
  void truncate(SeqId seq, int64_t n) { alloc_.truncate(seq, n); }
  int64_t length(SeqId seq) const { return alloc_.length(seq); }
  int64_t free_pages() const { return alloc_.free_pages(); }

  // Copies one page (all layers, all KV heads) on `stream`.
  void copy_page(int32_t src, int32_t dst, Stream stream);

 private:
  PagedKVLayout layout_;
  PageAllocator alloc_;
  uint8_t* pool_ = nullptr;
};

// ---- Host-side block helpers (tests, debugging): the layout above, written once ----------------

// Byte offset of block (layer, page, kv_head) in the pool.
inline int64_t block_offset(const PagedKVLayout& l, int64_t num_pages, int layer, int64_t page, int kv_head) {
  return ((int64_t(layer) * num_pages + page) * l.kv_heads + kv_head) * l.block_bytes();
}
// Int4: packs D codes (0..15, natural dim order) into a row of D/2 bytes in the page's nibble order.
void pack_int4_row(const uint8_t* codes, int head_dim, uint8_t* row);
void unpack_int4_row(const uint8_t* row, int head_dim, uint8_t* codes);

}  // namespace nibble::cuda
