#include "nibble/backend/cuda/atom_layout.h"

#include <algorithm>
#include <cstring>
#include <cstring>
#include <thread>
#include <vector>

#include "nibble/backend/cuda/cuda_check.h"
#include "nibble/core/error.h"
#include "nibble/core/half.h"

namespace nibble::cuda {

namespace {

// Byte offset inside a 512-byte slab block, and nibble (0 low, 1 high), of INT4 channel k < 128
// of row r (0..7) of the tile.
struct NibblePos {
  int byte;
  int high;
};
constexpr NibblePos int4_position(int r, int k) {
  const int s = k / 32, h = (k / 16) % 2, t = (k / 4) % 4, i = k % 4;
  // h == 0: high nibble (the (w & 0xF0F0F0F0) fragment, k-step columns 4t..4t+3)
  return {(4 * r + t) * 16 + 4 * s + i, h == 0 ? 1 : 0};
}
// Byte offset inside a slab block of INT8 channel k < 64 (of a half keeper group) of row r.
constexpr int int8_position(int r, int k) {
  const int s = k / 32, h = (k / 16) % 2, t = (k / 4) % 4, i = k % 4;
  return (4 * r + t) * 16 + 4 * (2 * s + h) + i;
}

// Nibble i of a 16-bit value into the low nibble of byte i.
constexpr uint32_t spread_nibbles(uint32_t v) {
  return (v & 0xF) | (v & 0xF0) << 4 | (v & 0xF00) << 8 | (v & 0xF000) << 12;
}

// Rows are independent (each owns its own bytes of every block): convert them in parallel.
template <typename F>
void for_rows(int64_t rows, int64_t work_per_row, F&& f) {
  const int64_t want = std::max<int64_t>(1, rows * work_per_row / (1 << 20));
  const int64_t threads = std::min<int64_t>({want, int64_t(std::max(1u, std::thread::hardware_concurrency())), rows});
  if (threads <= 1) {
    for (int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r) f(r);
    });
  for (auto& th : pool) th.join();
}

}  // namespace

AtomShape atom_shape(int64_t rows, int K, int keeper) {
  const std::string where = "atom_shape";
  require(rows >= 0 && K > 0, where, "bad shape rows={} K={}", rows, K);
  require(K % kGroup == 0 && keeper % kGroup == 0 && keeper >= 0 && keeper <= K, where,
        "K ({}) and keeper ({}) must be multiples of {} with keeper <= K", K, keeper, kGroup);
  AtomShape s;
  s.rows = rows;
  s.rows_pad = round_up(rows, 16);
  s.K = K;
  s.keeper = keeper;
  s.g4 = (K - keeper) / kGroup;
  s.g8 = keeper / kGroup;
  return s;
}

AtomPackedHost atom_quantize_host(const float* x, int64_t rows, int K, int keeper, float clip4, float clip8,
                                  quant::Format int4_format) {
  const std::string where = "atom_quantize_host";
  AtomPackedHost out;
  out.shape = atom_shape(rows, K, keeper);
  const int k4 = K - keeper;
  std::vector<float> part;
  if (k4 > 0) {
    part.resize(size_t(rows) * k4);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(&part[r * k4], x + r * K, sizeof(float) * k4);
    const auto q = quant::quantize_rows(part.data(), rows, k4, {int4_format, kGroup, 1, clip4}, where);
    out.q4.resize(size_t(rows) * k4 / 2);
    quant::pack_4bit(int4_format, q.codes.data(), int64_t(q.codes.size()), out.q4.data(), where);
    out.s4.resize(q.scales.size());
    for (size_t i = 0; i < q.scales.size(); ++i) out.s4[i] = quant::scale_to_bits(int4_format, q.scales[i]);
  }
  if (keeper > 0) {
    part.resize(size_t(rows) * keeper);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(&part[r * keeper], x + r * K + k4, sizeof(float) * keeper);
    const auto q = quant::quantize_rows(part.data(), rows, keeper, {quant::Format::Int8Sym, 0, 1, clip8}, where);
    out.q8.assign(q.codes.begin(), q.codes.end());
    out.s8.resize(q.scales.size());
    for (size_t i = 0; i < q.scales.size(); ++i)
      out.s8[i] = quant::scale_to_bits(quant::Format::Int8Sym, q.scales[i]);
  } else {
    out.s8.assign(size_t(rows), 0);
  }
  return out;
}

AtomGpuHost to_gpu_layout(const AtomPackedHost& p) {
  const AtomShape& sh = p.shape;
  const std::string where = "to_gpu_layout";
  const int k4 = sh.K - sh.keeper;
  require(int64_t(p.q4.size()) == sh.rows * k4 / 2 && int64_t(p.s4.size()) == sh.rows * sh.g4 &&
            int64_t(p.q8.size()) == sh.rows * sh.keeper && int64_t(p.s8.size()) == sh.rows,
        where, "buffer sizes do not match the shape [{}, {}] keeper {}", sh.rows, sh.K, sh.keeper);
  AtomGpuHost g;
  g.shape = sh;
  g.q.assign(size_t(sh.code_bytes()), 0);
  g.s.assign(size_t(sh.scale_count()), 0);
  const int slabs = sh.slabs();
  for_rows(sh.rows, sh.K, [&](int64_t row) {
    const int64_t tile = row / kRowTile;
    const int r = int(row % kRowTile);
    for (int grp = 0; grp < sh.g4; ++grp) {
      uint8_t* block = &g.q[size_t((tile * slabs + grp) * kSlabBytes)];
      const uint8_t* src = &p.q4[size_t(row * (k4 / 2) + grp * (kGroup / 2))];  // pack_4bit: 2i low, 2i+1 high
      // int4_position, a word at a time: bytes i = 0..3 of word (4r + t) * 4 + s hold channel
      // 32s + 4t + i in the high nibble and 32s + 16 + 4t + i in the low one; each set of four
      // channels is two source bytes, nibble i of a little-endian uint16 (from_gpu_layout inverts
      // it nibble by nibble, and the round-trip test holds the two together).
      for (int s = 0; s < 4; ++s)
        for (int t = 0; t < 4; ++t) {
          const uint32_t hi = src[16 * s + 2 * t] | uint32_t(src[16 * s + 2 * t + 1]) << 8;
          const uint32_t lo = src[16 * s + 8 + 2 * t] | uint32_t(src[16 * s + 8 + 2 * t + 1]) << 8;
          const uint32_t word = spread_nibbles(hi) << 4 | spread_nibbles(lo);
          std::memcpy(block + (4 * r + t) * 16 + 4 * s, &word, 4);
        }
      g.s[size_t(grp * sh.rows_pad + row)] = p.s4[size_t(row * sh.g4 + grp)];
    }
    for (int c = 0; c < sh.g8; ++c) {
      for (int h = 0; h < 2; ++h) {
        uint8_t* block = &g.q[size_t((tile * slabs + sh.g4 + 2 * c + h) * kSlabBytes)];
        for (int k = 0; k < 64; ++k)
          block[int8_position(r, k)] = uint8_t(p.q8[size_t(row * sh.keeper + c * kGroup + h * 64 + k)]);
      }
      g.s[size_t((sh.g4 + c) * sh.rows_pad + row)] = p.s8[size_t(row)];
    }
  });
  return g;
}

AtomPackedHost from_gpu_layout(const AtomGpuHost& g) {
  const AtomShape& sh = g.shape;
  const std::string where = "from_gpu_layout";
  require(int64_t(g.q.size()) == sh.code_bytes() && int64_t(g.s.size()) == sh.scale_count(), where,
        "buffer sizes do not match the shape");
  const int k4 = sh.K - sh.keeper;
  const int slabs = sh.slabs();
  AtomPackedHost p;
  p.shape = sh;
  p.q4.assign(size_t(sh.rows * k4 / 2), 0);
  p.s4.assign(size_t(sh.rows * sh.g4), 0);
  p.q8.assign(size_t(sh.rows * sh.keeper), 0);
  p.s8.assign(size_t(sh.rows), 0);
  for_rows(sh.rows, sh.K, [&](int64_t row) {
    const int64_t tile = row / kRowTile;
    const int r = int(row % kRowTile);
    for (int grp = 0; grp < sh.g4; ++grp) {
      const uint8_t* block = &g.q[size_t((tile * slabs + grp) * kSlabBytes)];
      for (int k = 0; k < kGroup; ++k) {
        const NibblePos pos = int4_position(r, k);
        const uint8_t nib = pos.high ? block[pos.byte] >> 4 : block[pos.byte] & 0xf;
        const int64_t col = int64_t(grp) * kGroup + k;
        p.q4[size_t(row * (k4 / 2) + col / 2)] |= uint8_t((col % 2) ? nib << 4 : nib);
      }
      p.s4[size_t(row * sh.g4 + grp)] = g.s[size_t(grp * sh.rows_pad + row)];
    }
    for (int c = 0; c < sh.g8; ++c) {
      for (int h = 0; h < 2; ++h) {
        const uint8_t* block = &g.q[size_t((tile * slabs + sh.g4 + 2 * c + h) * kSlabBytes)];
        for (int k = 0; k < 64; ++k)
          p.q8[size_t(row * sh.keeper + c * kGroup + h * 64 + k)] = int8_t(block[int8_position(r, k)]);
      }
      if (c == 0) p.s8[size_t(row)] = g.s[size_t(sh.g4 * sh.rows_pad + row)];
    }
  });
  return p;
}

AtomDeviceMatrix::AtomDeviceMatrix(const AtomShape& shape) : shape_(shape) {
  NIBBLE_CUDA_CHECK(cudaMalloc(&q_, size_t(std::max<int64_t>(shape.code_bytes(), 16))));
  NIBBLE_CUDA_CHECK(cudaMalloc(&s_, size_t(std::max<int64_t>(shape.scale_count(), 8)) * 2));
  NIBBLE_CUDA_CHECK(cudaMemset(q_, 0, size_t(shape.code_bytes())));
  NIBBLE_CUDA_CHECK(cudaMemset(s_, 0, size_t(shape.scale_count()) * 2));
}

AtomDeviceMatrix::AtomDeviceMatrix(const AtomGpuHost& host) : AtomDeviceMatrix(host.shape) {
  NIBBLE_CUDA_CHECK(cudaMemcpy(q_, host.q.data(), host.q.size(), cudaMemcpyHostToDevice));
  NIBBLE_CUDA_CHECK(cudaMemcpy(s_, host.s.data(), host.s.size() * 2, cudaMemcpyHostToDevice));
}

AtomDeviceMatrix::~AtomDeviceMatrix() { release(); }

void AtomDeviceMatrix::release() {
  if (q_) cudaFree(q_);
  if (s_) cudaFree(s_);
  q_ = nullptr;
  s_ = nullptr;
}

AtomDeviceMatrix::AtomDeviceMatrix(AtomDeviceMatrix&& o) noexcept : shape_(o.shape_), q_(o.q_), s_(o.s_) {
  o.q_ = nullptr;
  o.s_ = nullptr;
}

AtomDeviceMatrix& AtomDeviceMatrix::operator=(AtomDeviceMatrix&& o) noexcept {
  if (this != &o) {
    release();
    shape_ = o.shape_;
    q_ = o.q_;
    s_ = o.s_;
    o.q_ = nullptr;
    o.s_ = nullptr;
  }
  return *this;
}

AtomGpuHost AtomDeviceMatrix::download() const {
  AtomGpuHost h;
  h.shape = shape_;
  h.q.resize(size_t(shape_.code_bytes()));
  h.s.resize(size_t(shape_.scale_count()));
  NIBBLE_CUDA_CHECK(cudaMemcpy(h.q.data(), q_, h.q.size(), cudaMemcpyDeviceToHost));
  NIBBLE_CUDA_CHECK(cudaMemcpy(h.s.data(), s_, h.s.size() * 2, cudaMemcpyDeviceToHost));
  return h;
}

}  // namespace nibble::cuda
