#include "nibble/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include "nibble/core/error.h"
#include "nibble/io/output_file.h"

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

void check_finite_tensor(const float* values, int64_t n, const std::string& where, const std::string& tensor) {
  const int64_t i = find_non_finite(values, n);
  if (i < 0) return;
  throw Error(where, fmt::format("tensor '{}' holds {} at element {} (of {}): the file is damaged", tensor,
                                 std::isnan(values[i]) ? "NaN" : values[i] > 0 ? "+inf" : "-inf", i, n));
}

std::vector<float> finite_f32(const TensorInfo& t, const std::string& where) {
  std::vector<float> out(size_t(t.numel()));
  convert_to_f32(t.data, t.dtype, out.size(), out.data());
  check_finite_tensor(out.data(), int64_t(out.size()), where, t.name);
  return out;
}

void check_all_read(const std::vector<std::string>& all, const std::set<std::string>& read, const std::string& where) {
  std::vector<std::string> unread;
  for (const std::string& name : all)
    if (!read.count(name)) unread.push_back(name);
  if (unread.empty()) return;
  constexpr size_t kNamed = 3;
  std::string names;
  for (size_t i = 0; i < std::min(unread.size(), kNamed); ++i) names += (i ? ", '" : "'") + unread[i] + "'";
  throw Error(where, fmt::format("{} tensor(s) that the config does not use: {}{} (does the config match the "
                                 "checkpoint, e.g. num_hidden_layers, tie_word_embeddings?)",
                                 unread.size(), names, unread.size() > kNamed ? ", ..." : ""));
}

namespace {

// Largest header we accept (the Rust reference implementation uses 100 MB too).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

// A header nests three deep (the top object, a tensor's entry, its shape); deeper input is refused
// before it is built (a deeply nested header would otherwise take many times its size in memory).
constexpr int kMaxHeaderDepth = 8;

// Builds the header as nlohmann::json::parse does, in time linear in its size (a parser callback
// would make nlohmann rescan the top object after each entry: quadratic), refusing a key given
// twice at the top (nlohmann keeps the last silently) and nesting beyond kMaxHeaderDepth.
class HeaderSax {
 public:
  using json = nlohmann::json;
  HeaderSax(json& root, const std::string& where) : dom_(root), where_(where) {}

  bool null() { return dom_.null(); }
  bool boolean(bool v) { return dom_.boolean(v); }
  bool number_integer(json::number_integer_t v) { return dom_.number_integer(v); }
  bool number_unsigned(json::number_unsigned_t v) { return dom_.number_unsigned(v); }
  bool number_float(json::number_float_t v, const json::string_t& s) { return dom_.number_float(v, s); }
  bool string(json::string_t& v) { return dom_.string(v); }
  bool binary(json::binary_t& v) { return dom_.binary(v); }
  bool start_object(std::size_t n) { return enter() && dom_.start_object(n); }
  bool end_object() { --depth_; return dom_.end_object(); }
  bool start_array(std::size_t n) { return enter() && dom_.start_array(n); }
  bool end_array() { --depth_; return dom_.end_array(); }
  bool key(json::string_t& k) {
    check(depth_ != 1 || top_keys_.insert(k).second, where_, "header names tensor '{}' twice", k);
    return dom_.key(k);
  }
  template <typename Exception>
  bool parse_error(std::size_t position, const std::string& token, const Exception& e) {
    return dom_.parse_error(position, token, e);
  }

 private:
  bool enter() {
    check(++depth_ <= kMaxHeaderDepth, where_, "header nests deeper than {} levels", kMaxHeaderDepth);
    return true;
  }

  nlohmann::detail::json_sax_dom_parser<json> dom_;
  const std::string& where_;
  int depth_ = 0;
  std::set<std::string> top_keys_;
};

nlohmann::json parse_header_json(std::string_view text, const std::string& where) {
  nlohmann::json j;
  HeaderSax sax(j, where);
  try {
    nlohmann::json::sax_parse(text.begin(), text.end(), &sax);
  } catch (const nlohmann::json::exception& e) {
    throw Error(where, fmt::format("header is not valid JSON ({})", e.what()));
  }
  check(j.is_object(), where, "header is not a JSON object");
  return j;
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  const std::string where = path.string();
  // Checked before open(): opening a FIFO for reading blocks until a writer appears.
  struct stat st {};
  check(::stat(path.c_str(), &st) == 0, where, "cannot open file: {}", std::strerror(errno));
  check(S_ISREG(st.st_mode), where, "not a regular file (a directory, FIFO or device)");
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK);
  check(fd >= 0, where, "cannot open file: {}", std::strerror(errno));
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {  // replaced between stat and open
    ::close(fd);
    throw Error(where, "cannot stat file, or it is no longer a regular file");
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
  check(bytes.size() >= 8, where, "not a safetensors file ({} bytes, too short for the 8-byte header length)",
        bytes.size());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[size_t(i)];
  check(header_len <= kMaxHeaderBytes, where,
        "not a safetensors file (its first 8 bytes, the header length, say more than the {} byte limit)",
        kMaxHeaderBytes);
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
  // The tensors must tile the data section exactly (as the format requires): a gap or bytes left
  // over mean a wrong header length or offsets, and every tensor would be read from the wrong bytes.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;  // empty tensors first
  });
  uint64_t covered = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (ranges[i].begin < covered)  // covered > 0: an earlier tensor
      throw Error(where, fmt::format("tensors '{}' and '{}' overlap (bytes {}..{} and {}..{})", *ranges[i - 1].name,
                                     *ranges[i].name, ranges[i - 1].begin, ranges[i - 1].end, ranges[i].begin,
                                     ranges[i].end));
    check(ranges[i].begin == covered, where,
          "bytes {}..{} of the data section belong to no tensor (before '{}'): wrong data_offsets?", covered,
          ranges[i].begin, *ranges[i].name);
    covered = ranges[i].end;
  }
  check(covered == data_size, where,
        "the data section holds {} bytes but its tensors cover {}: wrong header length, or trailing bytes",
        data_size, covered);
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
      c.shard_of_[name] = f->path();
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

std::string Checkpoint::describe(const std::string& name) {
  constexpr std::string_view prefix = "model.layers.";
  if (!name.starts_with(prefix)) return fmt::format("tensor '{}'", name);
  const std::string rest = name.substr(prefix.size());
  return fmt::format("layer {}, tensor '{}'", rest.substr(0, rest.find('.')), name);
}

const TensorInfo& Checkpoint::check_tensor(const std::string& name, const std::vector<int64_t>& expected) const {
  const TensorInfo& t = get(name);
  if (!expected.empty() && t.shape != expected) {
    TensorInfo e;
    e.shape = expected;
    throw Error(where_, fmt::format("{} has shape {} but the config implies {}", describe(name), t.shape_str(),
                                    e.shape_str()));
  }
  check(dtype_is_float(t.dtype), where_, "{} has dtype {}, expected a floating-point type", describe(name),
        dtype_name(t.dtype));
  // The shard is mapped: had it shrunk since it was opened (rewritten, a copy still arriving),
  // reading the tensor would kill the process with SIGBUS instead of saying so.
  const std::string& file = shard_of_.at(name);
  struct stat st {};
  check(::stat(file.c_str(), &st) == 0, file, "{}: the shard is gone: {}", describe(name), std::strerror(errno));
  check(uint64_t(st.st_size) >= t.offset + t.nbytes, file,
        "{}: the shard is now {} bytes, shorter than the tensor's end at byte {} (truncated after it was opened)",
        describe(name), st.st_size, t.offset + t.nbytes);
  return t;
}

std::vector<float> Checkpoint::load_f32(const std::string& name, const std::vector<int64_t>& expected) const {
  const TensorInfo& t = check_tensor(name, expected);
  std::vector<float> out = finite_f32(t, where_);
  // The mapped pages now count in this process's RSS; they stay in the page cache, but out of
  // the RSS, so that a checkpoint read layer by layer does not add up to its whole size.
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t start = uintptr_t(t.data) & ~(page - 1), end = uintptr_t(t.data) + t.nbytes;
  if (t.nbytes > 0) madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED);
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

void SafetensorsWriter::write_to(const OutputSink& sink) const {
  nlohmann::ordered_json header;
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const auto& [name, e] : entries_) {
    header[name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.nbytes}}};
    offset += e.nbytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8) text.push_back(' ');  // keeps the data section 8-byte aligned
  char length[8];
  for (int i = 0; i < 8; ++i) length[i] = char(uint8_t(uint64_t(text.size()) >> (8 * i)));
  sink({length, 8});
  sink(text);
  std::vector<uint8_t> generated;
  for (const auto& [name, e] : entries_) {
    const std::vector<uint8_t>* bytes = &e.bytes;
    if (e.fill) {
      generated.resize(e.nbytes);
      e.fill(generated);
      bytes = &generated;
    }
    sink({reinterpret_cast<const char*>(bytes->data()), e.nbytes});
  }
}

std::vector<uint8_t> SafetensorsWriter::serialize() const {
  std::vector<uint8_t> out;
  write_to([&](std::string_view bytes) { out.insert(out.end(), bytes.begin(), bytes.end()); });
  return out;
}

void SafetensorsWriter::write(const std::filesystem::path& path, std::span<const std::filesystem::path> inputs) const {
  write_output_file(path, [this](const OutputSink& sink) { write_to(sink); }, inputs);
}

}  // namespace nibble
