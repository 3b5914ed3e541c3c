// safetensors: read (mmap, zero-copy, every header field validated) and write.
// Format: u64 little-endian header length N, N bytes of JSON header, then the data section.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <iosfwd>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/core/dtype.h"

namespace nibble {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;           // byte offset of the data within the whole file
  const uint8_t* data = nullptr; // points into the mapping; valid while the file is open
  size_t nbytes = 0;

  int64_t numel() const;
  std::string shape_str() const;  // "[4096, 11008]"
};

class SafetensorsFile {
 public:
  // Maps the file and validates its header; throws nibble::Error naming the file and the problem.
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  // Validates an in-memory file image (the fuzz target's entry point). `bytes` must outlive the result.
  static std::shared_ptr<SafetensorsFile> parse(std::span<const uint8_t> bytes, const std::string& where);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return where_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& get(const std::string& name) const;  // throws when missing
  // The header's "__metadata__" (string -> string), empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  void parse_header(std::span<const uint8_t> bytes);

  std::string where_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one safetensors file, or a directory holding model.safetensors or shards listed
// in model.safetensors.index.json. Tensors are looked up by name across all files.
class Checkpoint {
 public:
  static Checkpoint open(const std::filesystem::path& path);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo& get(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  // The tensor as fp32, after checking its shape equals `expected` (empty: any shape).
  std::vector<float> load_f32(const std::string& name, const std::vector<int64_t>& expected = {}) const;
  std::string where() const { return where_; }

 private:
  std::string where_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

// Collects tensors and writes one safetensors file (8-byte aligned data, sorted names).
class SafetensorsWriter {
 public:
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);
  template <typename T>
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, const std::vector<T>& v) {
    add(name, dtype, std::move(shape),
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)));
  }
  // A tensor whose bytes `fill` writes (every byte of a buffer of the tensor's size) when the file is
  // written, so that only one such tensor is in memory at a time, however large the file.
  using Fill = std::function<void(std::span<uint8_t>)>;
  void add_generated(const std::string& name, DType dtype, std::vector<int64_t> shape, Fill fill);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Writes to a temporary name and renames, so a crash never leaves a half-written file.
  void write(const std::filesystem::path& path) const;
  std::vector<uint8_t> serialize() const;

 private:
  void write_to(std::ostream& out) const;

  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;  // empty when generated
    size_t nbytes = 0;
    Fill fill;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace nibble
