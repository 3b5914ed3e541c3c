// safetensors reading and writing: round trip, and every kind of bad header refused with an
// error naming the file, the tensor and the problem (never a crash or silent garbage).
#include <cstring>
#include <fstream>

#include <gtest/gtest.h>

#include "nibble/core/error.h"
#include "nibble/io/safetensors.h"
#include "nibble/model/model.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

std::vector<uint8_t> file_with_header(const std::string& header, size_t data_bytes) {
  std::vector<uint8_t> f(8 + header.size() + data_bytes, 0xab);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) f[size_t(i)] = uint8_t(n >> (8 * i));
  std::memcpy(f.data() + 8, header.data(), header.size());
  return f;
}

// Parses `header` with `data_bytes` of data and returns the error text ("" if it parsed).
std::string error_of(const std::string& header, size_t data_bytes) {
  const auto f = file_with_header(header, data_bytes);
  try {
    SafetensorsFile::parse(f, "t.safetensors");
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

TEST(Safetensors, WriteThenReadRoundTrip) {
  SafetensorsWriter w;
  const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.125f};
  const std::vector<uint16_t> b = {0x3c00, 0xc000};
  w.add("a", DType::F32, {2, 3}, a);
  w.add("b", DType::F16, {2}, b);
  w.set_metadata("k", "v");
  const auto path = std::filesystem::temp_directory_path() / "nibble_test_rt.safetensors";
  w.write(path);
  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f->metadata().at("k"), "v");
  const TensorInfo& ta = f->get("a");
  EXPECT_EQ(ta.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ta.offset % 8, 0u);
  EXPECT_EQ(std::memcmp(ta.data, a.data(), 24), 0);
  const Checkpoint ck = Checkpoint::open(path);
  EXPECT_EQ(ck.load_f32("b"), (std::vector<float>{1.0f, -2.0f}));
  EXPECT_THROW(ck.load_f32("a", {3, 2}), Error);
  std::filesystem::remove(path);
}

TEST(Safetensors, BadHeadersAreRefusedWithTheReason) {
  const std::string ok = R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(error_of(ok, 8), "");
  struct Case {
    std::string header;
    size_t data;
    std::string expect;
  };
  const Case cases[] = {
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8, "not valid JSON"},
      {R"([1,2])", 0, "not a JSON object"},
      {ok, 4, "past the end"},
      {ok, 7, "past the end"},  // one byte short: the boundary from below (8 bytes parse, above)
      {R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "need 12"},
      {R"({"x":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype"},
      {R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "negative"},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, "reversed"},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"x":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       16, "twice"},
      {R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       16, "overlap"},
      {R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, "overflows"},
      {R"({"x":{"dtype":"F32","shape":[2]}})", 8, "data_offsets"},
      {R"({"__metadata__":{"a":1}})", 0, "not a string"},
  };
  for (const auto& c : cases) {
    const std::string err = error_of(c.header, c.data);
    EXPECT_NE(err.find(c.expect), std::string::npos) << "header " << c.header << " gave: '" << err << "'";
    EXPECT_NE(err.find("t.safetensors"), std::string::npos) << err;
  }
}

TEST(Safetensors, TruncatedAndTinyFiles) {
  for (size_t n : {0, 3, 7}) {
    std::vector<uint8_t> f(n, 0);
    EXPECT_THROW(SafetensorsFile::parse(f, "t"), Error) << n;
  }
  auto f = file_with_header(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
  f.resize(20);  // cut inside the header
  try {
    SafetensorsFile::parse(f, "t");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
}

// A real checkpoint damaged on disk: a missing shard, a wrong shape and a cut file.
TEST(Safetensors, DamagedCheckpointsFailToLoadCleanly) {
  NIBBLE_REQUIRE_DATA("models/stories260K/model.safetensors");
  namespace fs = std::filesystem;
  const fs::path src = test::data_dir() / "models/stories260K";
  const fs::path dir = fs::temp_directory_path() / "nibble_test_damaged";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(src / "config.json", dir / "config.json");
  EXPECT_THROW(Model::load(dir), Error);  // no weights at all
  // Cut the file in its data section.
  {
    std::ifstream in(src / "model.safetensors", std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(dir / "model.safetensors", std::ios::binary).write(bytes.data(), std::streamsize(bytes.size() / 2));
  }
  try {
    Model::load(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
  // A config that disagrees with the tensors' shapes.
  fs::copy_file(src / "model.safetensors", dir / "model.safetensors", fs::copy_options::overwrite_existing);
  auto config = nlohmann::json::parse(std::ifstream(src / "config.json"));
  config["intermediate_size"] = 180;
  std::ofstream(dir / "config.json") << config.dump();
  try {
    Model::load(dir);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shape"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace nibble
