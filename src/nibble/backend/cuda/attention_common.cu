#include "nibble/backend/cuda/attention_common.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "nibble/backend/cuda/cuda_check.h"

namespace nibble::cuda {

// ---- AttentionBatchBuilder ---------------------------------------------------------------------

AttentionBatchBuilder::AttentionBatchBuilder(int max_seqs, int64_t max_tokens, int max_blocks)
    : fixed_(true), fixed_blocks_(std::max(max_blocks, 1)) {
  require(max_seqs >= 1 && max_tokens >= 1, "AttentionBatchBuilder", "capacity of {} sequences and {} tokens",
          max_seqs, max_tokens);
  const size_t tiles = size_t(max_seqs) + size_t(max_tokens) / kPrefillTileRows;
  ensure(size_t(max_seqs) * size_t(fixed_blocks_) + 2 * size_t(max_seqs) + 2 * size_t(max_tokens) + 2 * tiles + 32);
}

AttentionBatchBuilder::~AttentionBatchBuilder() {
  if (device_) cudaFree(device_);
  if (host_) cudaFreeHost(host_);
}

void AttentionBatchBuilder::ensure(size_t words) {
  if (words <= capacity_) return;
  // cudaFree and cudaFreeHost wait for the work that may still read the old buffers.
  if (device_) NIBBLE_CUDA_CHECK(cudaFree(device_));
  if (host_) NIBBLE_CUDA_CHECK(cudaFreeHost(host_));
  device_ = nullptr;
  host_ = nullptr;
  capacity_ = std::max(words, capacity_ * 2);
  NIBBLE_CUDA_CHECK(cudaMalloc(&device_, capacity_ * sizeof(int32_t)));
  NIBBLE_CUDA_CHECK(cudaMallocHost(&host_, capacity_ * sizeof(int32_t)));
}

AttentionBatch AttentionBatchBuilder::build(const PageAllocator& alloc, std::span<const SeqId> seqs,
                                            std::span<const int> new_tokens, Stream stream, int pad_to,
                                            int32_t pad_page) {
  require(seqs.size() == new_tokens.size(), "AttentionBatchBuilder", "{} sequences but {} new-token counts",
          seqs.size(), new_tokens.size());
  const int real = int(seqs.size()), pads = std::max(pad_to - real, 0);
  require(pads == 0 || (pad_page >= 0 && pad_page < alloc.num_pages()), "AttentionBatchBuilder",
          "padding rows need a set-aside page, not {}", pad_page);
  AttentionBatch b;
  b.batch = real + pads;
  int64_t tokens = pads;
  b.num_tiles = pads;
  if (pads) b.max_new = 1, b.max_seq_len = 1, b.max_blocks = 1;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t len = alloc.length(seqs[i]);
    require(new_tokens[i] >= 0 && new_tokens[i] <= len, "AttentionBatchBuilder",
            "sequence {} holds {} tokens, fewer than its {} new ones", seqs[i], len, new_tokens[i]);
    b.max_blocks = std::max<int>(b.max_blocks, int(alloc.block_table(seqs[i]).size()));
    b.max_seq_len = std::max<int>(b.max_seq_len, int(len));
    b.max_new = std::max(b.max_new, new_tokens[i]);
    tokens += new_tokens[i];
    b.num_tiles += (new_tokens[i] + kPrefillTileRows - 1) / kPrefillTileRows;
  }
  require(!fixed_ || b.max_blocks <= fixed_blocks_, "AttentionBatchBuilder",
          "a sequence holds {} pages, more than the {} reserved at start", b.max_blocks, fixed_blocks_);
  b.max_blocks = fixed_ ? fixed_blocks_ : std::max(b.max_blocks, 1);
  b.num_tokens = int(tokens);

  // The small arrays first, the block tables last: their layout depends only on the batch's sizes.
  const auto align4 = [](size_t n) { return (n + 3) / 4 * 4; };
  const size_t o_len = 0;
  const size_t o_cu = align4(o_len + size_t(b.batch));
  const size_t o_ts = align4(o_cu + size_t(b.batch) + 1);
  const size_t o_tp = align4(o_ts + size_t(tokens));
  const size_t o_tiles = align4(o_tp + size_t(tokens));
  const size_t o_bt = align4(o_tiles + 2 * size_t(b.num_tiles));
  const size_t total = align4(o_bt + size_t(b.batch) * size_t(b.max_blocks)) + 4;
  require(!fixed_ || total <= capacity_, "AttentionBatchBuilder",
          "a step needs {} words of batch metadata, more than the {} reserved at start", total, capacity_);
  ensure(total);
  std::fill(host_, host_ + total, 0);

  struct Tile {
    int seq, q0, work;
  };
  std::vector<Tile> tiles;
  tiles.reserve(size_t(b.num_tiles));
  int32_t cu = 0;
  for (int i = 0; i < real; ++i) {
    const auto& table = alloc.block_table(seqs[size_t(i)]);
    std::copy(table.begin(), table.end(), host_ + o_bt + size_t(i) * size_t(b.max_blocks));
    const int len = int(alloc.length(seqs[size_t(i)]));
    const int n = new_tokens[size_t(i)];
    const int context = len - n;
    host_[o_len + size_t(i)] = len;
    host_[o_cu + size_t(i)] = cu;
    for (int j = 0; j < n; ++j) {
      host_[o_ts + size_t(cu + j)] = i;
      host_[o_tp + size_t(cu + j)] = context + j;
    }
    for (int q0 = 0; q0 < n; q0 += kPrefillTileRows)
      tiles.push_back({i, q0, context + std::min(q0 + kPrefillTileRows, n)});
    cu += n;
  }
  for (int i = real; i < b.batch; ++i, ++cu) {  // padding: token 0 of the set-aside page
    host_[o_bt + size_t(i) * size_t(b.max_blocks)] = pad_page;
    host_[o_len + size_t(i)] = 1;
    host_[o_cu + size_t(i)] = cu;
    host_[o_ts + size_t(cu)] = i;
    host_[o_tp + size_t(cu)] = 0;
    tiles.push_back({i, 0, 1});
  }
  host_[o_cu + size_t(b.batch)] = cu;
  // Longest tiles first: the last wave then holds the short ones.
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& c) { return a.work > c.work; });
  for (size_t t = 0; t < tiles.size(); ++t) {
    host_[o_tiles + 2 * t] = tiles[t].seq;
    host_[o_tiles + 2 * t + 1] = tiles[t].q0;
  }

  NIBBLE_CUDA_CHECK(cudaMemcpyAsync(device_, host_, total * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  const int32_t* d = static_cast<const int32_t*>(device_);
  b.block_tables = d + o_bt;
  b.seq_lens = d + o_len;
  b.cu_new = d + o_cu;
  b.token_seq = d + o_ts;
  b.token_pos = d + o_tp;
  b.tiles = reinterpret_cast<const int2*>(d + o_tiles);
  return b;
}

// ---- RopeTable -------------------------------------------------------------------------------

RopeTable::RopeTable(std::span<const double> inv_freq, int max_positions)
    : max_positions_(max_positions), half_dim_(int(inv_freq.size())) {
  require(max_positions > 0 && half_dim_ > 0, "RopeTable", "bad RoPE table {} x {}", max_positions, half_dim_);
  std::vector<float2> host(size_t(max_positions) * size_t(half_dim_));
  for (int p = 0; p < max_positions; ++p)
    for (int i = 0; i < half_dim_; ++i) {
      const double angle = double(p) * inv_freq[size_t(i)];
      host[size_t(p) * size_t(half_dim_) + size_t(i)] = make_float2(float(std::cos(angle)), float(std::sin(angle)));
    }
  NIBBLE_CUDA_CHECK(cudaMalloc(&table_, host.size() * sizeof(float2)));
  NIBBLE_CUDA_CHECK(cudaMemcpy(table_, host.data(), host.size() * sizeof(float2), cudaMemcpyHostToDevice));
}

RopeTable::~RopeTable() {
  if (table_) cudaFree(table_);
}

// ---- AttentionWorkspace ------------------------------------------------------------------------

AttentionWorkspace::~AttentionWorkspace() {
  if (ptr_) cudaFree(ptr_);
}

void* AttentionWorkspace::get(size_t bytes) {
  if (bytes > bytes_) {
    if (ptr_) {
      NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());  // a kernel may still use the old buffer
      NIBBLE_CUDA_CHECK(cudaFree(ptr_));
    }
    bytes_ = std::max(bytes, bytes_ * 2);
    NIBBLE_CUDA_CHECK(cudaMalloc(&ptr_, bytes_));
    // attention_decode's arrival counters start at zero (synchronized: the caller's stream may not
    // be ordered after the legacy default stream).
    NIBBLE_CUDA_CHECK(cudaMemset(ptr_, 0, bytes_));
    NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  return ptr_;
}

}  // namespace nibble::cuda
