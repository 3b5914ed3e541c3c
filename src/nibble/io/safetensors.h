// safetensors: read (mmap, zero-copy, every header field validated) and write.
// Format: u64 little-endian header length N, N bytes of JSON header, then the data section.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/core/dtype.h"
#include "nibble/io/output_file.h"

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

// Throws nibble::Error(where, ...) naming `tensor` and the index of its first NaN or ±inf among
// values[0, n): no working model has a non-finite weight, norm or scale, and one would turn every
// result into NaN.
void check_finite_tensor(const float* values, int64_t n, const std::string& where, const std::string& tensor);
// A floating-point tensor as fp32, checked finite (check_finite_tensor).
std::vector<float> finite_f32(const TensorInfo& t, const std::string& where);

// Throws nibble::Error(where, ...) naming the tensors of `all` missing from `read` (at most a few,
// and how many in all): a tensor that nothing reads means the file and its config disagree (fewer
// layers in the config, a renamed tensor), and the model would run without it.
void check_all_read(const std::vector<std::string>& all, const std::set<std::string>& read, const std::string& where);

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
  // load_f32's checks without reading: the shape, a float dtype, and the shard (mapped) still
  // holding the tensor's bytes, so that a shard truncated mid-run is named, not a SIGBUS.
  const TensorInfo& check_tensor(const std::string& name, const std::vector<int64_t>& expected = {}) const;
  // "layer 3, tensor 'model.layers.3.mlp.up_proj.weight'" (or "tensor 'name'" outside the layers).
  static std::string describe(const std::string& name);
  std::string where() const { return where_; }

 private:
  std::string where_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
  std::map<std::string, std::string> shard_of_;  // tensor name -> its file
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
  // Writes through write_output_file (output_file.h): never over a device, FIFO, link or one of
  // `inputs`, and never a half-written file.
  void write(const std::filesystem::path& path, std::span<const std::filesystem::path> inputs = {}) const;
  std::vector<uint8_t> serialize() const;

 private:
  void write_to(const OutputSink& sink) const;

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
