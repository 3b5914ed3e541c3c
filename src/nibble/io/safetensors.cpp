#include "nibble/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "nibble/core/error.h"

namespace nibble {

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace {

// Largest header we accept (the Rust reference implementation uses 100 MB too).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

nlohmann::json parse_header_json(std::string_view text, const std::string& where) {
  // nlohmann keeps the last of duplicate keys silently; a parser callback sees every top-level key.
  std::set<std::string> seen;
  std::string duplicate;
  auto cb = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      const std::string key = parsed.get<std::string>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.begin(), text.end(), cb);
  } catch (const nlohmann::json::exception& e) {
    throw Error(where, fmt::format("header is not valid JSON ({})", e.what()));
  }
  check(duplicate.empty(), where, "header names tensor '{}' twice", duplicate);
  check(j.is_object(), where, "header is not a JSON object");
  return j;
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  const std::string where = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY);
  check(fd >= 0, where, "cannot open file: {}", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(where, "cannot stat file");
  }
  const size_t size = size_t(st.st_size);
  void* map = nullptr;
  if (size > 0) {
    map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      ::close(fd);
      throw Error(where, fmt::format("cannot map file: {}", std::strerror(errno)));
    }
  }
  ::close(fd);
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->where_ = where;
  f->map_ = map;
  f->map_size_ = size;
  f->parse_header({static_cast<const uint8_t*>(map), size});
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::parse(std::span<const uint8_t> bytes, const std::string& where) {
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->where_ = where;
  f->parse_header(bytes);
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(map_, map_size_);
}

void SafetensorsFile::parse_header(std::span<const uint8_t> bytes) {
  const std::string& where = where_;
  check(bytes.size() >= 8, where, "file is {} bytes, too short for the 8-byte header length", bytes.size());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[size_t(i)];
  check(header_len <= kMaxHeaderBytes, where, "header length {} is over the {} byte limit", header_len, kMaxHeaderBytes);
  check(header_len <= bytes.size() - 8, where, "header length {} runs past the end of the file ({} bytes): truncated?",
        header_len, bytes.size());
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), size_t(header_len));
  const nlohmann::json header = parse_header_json(text, where);
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = bytes.size() - data_start;

  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      check(entry.is_object(), where, "__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        check(v.is_string(), where, "__metadata__ value of '{}' is not a string", k);
        metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string tw = fmt::format("{}: tensor '{}'", where, name);
    check(entry.is_object(), tw, "entry is not an object");
    check(entry.contains("dtype") && entry["dtype"].is_string(), tw, "missing or non-string 'dtype'");
    check(entry.contains("shape") && entry["shape"].is_array(), tw, "missing or non-array 'shape'");
    check(entry.contains("data_offsets") && entry["data_offsets"].is_array() && entry["data_offsets"].size() == 2,
          tw, "'data_offsets' must be an array of two integers");
    TensorInfo t;
    t.name = name;
    const std::string dt = entry["dtype"].get<std::string>();
    check(dtype_from_name(dt, &t.dtype), tw, "unknown dtype '{}'", dt);
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      check(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0), tw,
            "shape {} has a non-integer or negative dimension", entry["shape"].dump());
      const uint64_t dim = d.get<uint64_t>();
      check(dim == 0 || numel <= std::numeric_limits<uint64_t>::max() / dim / 8, tw, "shape {} overflows",
            entry["shape"].dump());
      numel *= dim;
      t.shape.push_back(int64_t(dim));
    }
    for (const auto& o : entry["data_offsets"])
      check(o.is_number_unsigned() || (o.is_number_integer() && o.get<int64_t>() >= 0), tw,
            "data_offsets {} are not non-negative integers", entry["data_offsets"].dump());
    const uint64_t begin = entry["data_offsets"][0].get<uint64_t>();
    const uint64_t end = entry["data_offsets"][1].get<uint64_t>();
    check(begin <= end, tw, "data_offsets [{}, {}] are reversed", begin, end);
    check(end <= data_size, tw, "data_offsets [{}, {}] run past the end of the data section ({} bytes): truncated?",
          begin, end, data_size);
    const uint64_t expected = numel * dtype_size(t.dtype);
    check(end - begin == expected, tw, "holds {} bytes but dtype {} and shape {} need {}", end - begin, dt,
          t.shape_str(), expected);
    t.offset = data_start + begin;
    t.data = bytes.data() + t.offset;
    t.nbytes = size_t(expected);
    auto [it, inserted] = tensors_.emplace(name, std::move(t));
    ranges.push_back({begin, end, &it->first});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i)
    check(ranges[i].begin >= ranges[i - 1].end, where, "tensors '{}' and '{}' overlap (bytes {}..{} and {}..{})",
          *ranges[i - 1].name, *ranges[i].name, ranges[i - 1].begin, ranges[i - 1].end, ranges[i].begin,
          ranges[i].end);
}

const TensorInfo& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  check(it != tensors_.end(), where_, "tensor '{}' not found", name);
  return it->second;
}

Checkpoint Checkpoint::open(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  Checkpoint c;
  c.where_ = path.string();
  check(fs::exists(path), c.where_, "no such file or directory");
  std::vector<fs::path> shards;
  if (fs::is_directory(path)) {
    const fs::path index = path / "model.safetensors.index.json";
    if (fs::exists(index)) {
      std::ifstream in(index);
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(in);
      } catch (const nlohmann::json::exception& e) {
        throw Error(index.string(), fmt::format("not valid JSON ({})", e.what()));
      }
      check(j.contains("weight_map") && j["weight_map"].is_object(), index.string(), "missing 'weight_map' object");
      std::set<std::string> files;
      for (const auto& [name, file] : j["weight_map"].items()) {
        check(file.is_string(), index.string(), "weight_map entry '{}' is not a file name", name);
        files.insert(file.get<std::string>());
      }
      for (const auto& f : files) {
        check(fs::path(f).filename() == fs::path(f), index.string(), "shard name '{}' must be a plain file name", f);
        shards.push_back(path / f);
      }
    } else if (fs::exists(path / "model.safetensors")) {
      shards.push_back(path / "model.safetensors");
    } else {
      throw Error(c.where_, "no model.safetensors or model.safetensors.index.json in this directory");
    }
  } else {
    shards.push_back(path);
  }
  for (const auto& s : shards) c.files_.push_back(SafetensorsFile::open(s));
  for (const auto& f : c.files_)
    for (const auto& [name, info] : f->tensors()) {
      check(!c.index_.count(name), f->path(), "tensor '{}' also appears in another shard", name);
      c.index_[name] = &info;
    }
  return c;
}

const TensorInfo& Checkpoint::get(const std::string& name) const {
  auto it = index_.find(name);
  check(it != index_.end(), where_, "tensor '{}' not found in the checkpoint", name);
  return *it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : index_) out.push_back(name);
  return out;
}

std::vector<float> Checkpoint::load_f32(const std::string& name, const std::vector<int64_t>& expected) const {
  const TensorInfo& t = get(name);
  if (!expected.empty() && t.shape != expected) {
    TensorInfo e;
    e.shape = expected;
    throw Error(where_, fmt::format("tensor '{}' has shape {} but the config implies {}", name, t.shape_str(),
                                    e.shape_str()));
  }
  check(dtype_is_float(t.dtype), where_, "tensor '{}' has dtype {}, expected a floating-point type", name,
        dtype_name(t.dtype));
  std::vector<float> out(size_t(t.numel()));
  convert_to_f32(t.data, t.dtype, out.size(), out.data());
  return out;
}

namespace {
size_t tensor_bytes(DType dtype, const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return size_t(numel) * dtype_size(dtype);
}
}  // namespace

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                            std::span<const uint8_t> bytes) {
  check(tensor_bytes(dtype, shape) == bytes.size(), name, "writer: {} bytes do not match the shape", bytes.size());
  check(!entries_.count(name), name, "writer: tensor added twice");
  entries_[name] = Entry{dtype, std::move(shape), std::vector<uint8_t>(bytes.begin(), bytes.end()), bytes.size(), {}};
}

void SafetensorsWriter::add_generated(const std::string& name, DType dtype, std::vector<int64_t> shape, Fill fill) {
  check(!entries_.count(name), name, "writer: tensor added twice");
  const size_t nbytes = tensor_bytes(dtype, shape);
  entries_[name] = Entry{dtype, std::move(shape), {}, nbytes, std::move(fill)};
}

void SafetensorsWriter::write_to(std::ostream& out) const {
  nlohmann::ordered_json header;
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.nbytes}}};
    offset += e.nbytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8) text.push_back(' ');  // keeps the data section 8-byte aligned
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  out.write(reinterpret_cast<const char*>(length), 8);
  out.write(text.data(), std::streamsize(text.size()));
  std::vector<uint8_t> generated;
  for (const auto& [name, e] : entries_) {
    const std::vector<uint8_t>* bytes = &e.bytes;
    if (e.fill) {
      generated.resize(e.nbytes);
      e.fill(generated);
      bytes = &generated;
    }
    out.write(reinterpret_cast<const char*>(bytes->data()), std::streamsize(e.nbytes));
  }
}

std::vector<uint8_t> SafetensorsWriter::serialize() const {
  std::ostringstream out;
  write_to(out);
  const std::string s = std::move(out).str();
  return {s.begin(), s.end()};
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  const std::filesystem::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary);
    check(bool(out), tmp.string(), "cannot create file");
    write_to(out);
    check(bool(out), tmp.string(), "write failed (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace nibble
