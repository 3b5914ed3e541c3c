// Atom's W4A4 operands: the file layout (as format.h quantizes and packs them) and the GPU layout
// the CUDA kernels read, with the conversion between them (done at load time, tested both ways).
//
// File layout of a [rows, K] matrix with `keeper` INT8 channels at the end (Atom-packed along K):
//   q4 [rows, (K-keeper)/2]    INT4 codes of the first K-keeper channels, quant::pack_4bit
//   s4 [rows, (K-keeper)/128]  fp16 scale per (row, group of 128)
//   q8 [rows, keeper]          INT8 codes of the keeper channels
//   s8 [rows]                  fp16 scale per row over the keeper channels
//
// GPU layout ("slab tiles"): K is cut into slabs; slab j < G4 is INT4 group j (128 channels),
// slab G4 + 2c + h is half h (64 channels) of keeper group c (INT8). Rows are padded to
// rows_pad = round_up(rows, 16) and cut into 8-row tiles. Every (row tile, slab) is one 512-byte
// block, stored at q[(tile * slabs + slab) * 512]; inside it lane L = 4 * r + t (r = row in the
// tile, t = 0..3) owns bytes [16 L, 16 L + 16), four 32-bit words w[0..3]: exactly what that lane
// of a warp needs as `mma.sync.m16n8k32.s8` fragments (a B fragment of the 8 rows, or half of an A
// fragment of 16 rows), so a warp reads a block with one conflict-free 16-byte load per lane.
//   INT4 slab, word s (k-step s, 32 channels):  the high nibble of byte i holds channel
//     32 s + 4 t + i, the low nibble channel 32 s + 16 + 4 t + i. Then (w & 0xF0F0F0F0) is the
//     fragment for k = 4t..4t+3 and (w << 4) & 0xF0F0F0F0 the one for k = 16+4t..16+4t+3, each
//     byte 16 * code (two logic ops, no permute): the integer dot comes out 256 times too big,
//     which the kernel divides out exactly in fp32.
//   INT8 slab, word j: byte i holds channel 32 (j / 2) + 16 (j % 2) + 4 t + i (k-steps 0, 1).
// So one row's 128 INT4 channels of a group are the 64 contiguous bytes [64 r, 64 r + 64).
// Scales: s[group][rows_pad] fp16 bits, group < G4 the INT4 groups, G4 + c the keeper scale of
// the row (repeated for each keeper group). Padding rows hold code 0 and scale 0.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_fp16.h>

#include "nibble/quant/format.h"

namespace nibble::cuda {

inline constexpr int kGroup = 128;      // INT4 group along K
inline constexpr int kSlabBytes = 512;  // one (8-row tile, slab) block
inline constexpr int kRowTile = 8;
inline constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Shape bookkeeping shared by host and device code.
struct AtomShape {
  int64_t rows = 0, rows_pad = 0;
  int K = 0, keeper = 0;
  int g4 = 0;  // INT4 groups
  int g8 = 0;  // keeper groups of 128
  constexpr int slabs() const { return g4 + 2 * g8; }
  constexpr int groups() const { return g4 + g8; }
  constexpr int64_t code_bytes() const { return rows_pad / kRowTile * slabs() * int64_t(kSlabBytes); }
  constexpr int64_t scale_count() const { return int64_t(groups()) * rows_pad; }
  // Bytes a kernel must read for this operand (codes + scales of the real rows).
  constexpr int64_t packed_bytes() const { return rows * ((K - keeper) / 2 + keeper) + rows * groups() * 2; }
};
// Throws nibble::Error unless rows >= 0, K > 0 and K, keeper are multiples of 128, keeper <= K.
AtomShape atom_shape(int64_t rows, int K, int keeper);

// A device operand in the GPU layout (non-owning).
struct AtomOperand {
  const uint8_t* q = nullptr;  // code_bytes()
  const __half* s = nullptr;   // [groups][rows_pad]
  AtomShape shape;
};
struct AtomOperandMut {
  uint8_t* q = nullptr;
  __half* s = nullptr;
  AtomShape shape;
  operator AtomOperand() const { return {q, s, shape}; }
};

// The file layout, host memory.
struct AtomPackedHost {
  AtomShape shape;
  std::vector<uint8_t> q4;   // [rows, (K-keeper)/2]
  std::vector<uint16_t> s4;  // [rows, g4]
  std::vector<int8_t> q8;    // [rows, keeper]
  std::vector<uint16_t> s8;  // [rows]
};

// Quantizes x [rows, K] (channels already in the permuted order) with format.h: the first
// K-keeper channels Int4Sym (or Int4SymAtomGptq's grid, same codes) in groups of 128 with clip4,
// the keeper channels Int8Sym with one scale per row and clip8; then packs them (pack_4bit).
AtomPackedHost atom_quantize_host(const float* x, int64_t rows, int K, int keeper, float clip4, float clip8,
                                  quant::Format int4_format = quant::Format::Int4Sym);

// The GPU layout, host memory (what gets uploaded).
struct AtomGpuHost {
  AtomShape shape;
  std::vector<uint8_t> q;
  std::vector<uint16_t> s;
};
AtomGpuHost to_gpu_layout(const AtomPackedHost& packed);    // `pack` for CUDA
AtomPackedHost from_gpu_layout(const AtomGpuHost& gpu);     // its inverse (tests, debugging)

// Owning device copy.
class AtomDeviceMatrix {
 public:
  AtomDeviceMatrix() = default;
  explicit AtomDeviceMatrix(const AtomShape& shape);  // allocated, zero-filled
  explicit AtomDeviceMatrix(const AtomGpuHost& host);  // uploaded (synchronously)
  ~AtomDeviceMatrix();
  AtomDeviceMatrix(AtomDeviceMatrix&& o) noexcept;
  AtomDeviceMatrix& operator=(AtomDeviceMatrix&& o) noexcept;
  AtomDeviceMatrix(const AtomDeviceMatrix&) = delete;
  AtomDeviceMatrix& operator=(const AtomDeviceMatrix&) = delete;

  AtomOperand view() const { return {q_, s_, shape_}; }
  AtomOperandMut mut() { return {q_, s_, shape_}; }
  AtomGpuHost download() const;
  const AtomShape& shape() const { return shape_; }

 private:
  void release();
  AtomShape shape_;
  uint8_t* q_ = nullptr;
  __half* s_ = nullptr;
};

}  // namespace nibble::cuda
