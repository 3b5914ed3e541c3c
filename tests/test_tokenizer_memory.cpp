// Tokenizer::from_files (the packed file's tokenizer, read from memory) equals Tokenizer::load on
// the same files on disk, for every reference tokenizer: ids, BOS/EOS and decoding.
#include <gtest/gtest.h>

#include "nibble/io/text_file.h"
#include "nibble/tokenizer/tokenizer.h"
#include "tests/test_util.h"

namespace nibble {
namespace {

namespace fs = std::filesystem;

std::string read_if_exists(const fs::path& p) { return fs::exists(p) ? read_text_file(p) : std::string(); }

TEST(TokenizerMemory, EqualsTheTokenizerLoadedFromFiles) {
  NIBBLE_REQUIRE_DATA("tokenizers");
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(test::data_dir() / "tokenizers")) dirs.push_back(e.path());
  if (fs::exists(test::data_dir() / "models/stories260K")) dirs.push_back(test::data_dir() / "models/stories260K");
  ASSERT_FALSE(dirs.empty());
  const std::vector<std::string> texts = {"Once upon a time", " leading space\nand lines\t<s> tags </s>",
                                          "naïve 東京 🙂 1234567", ""};
  for (const fs::path& dir : dirs) {
    SCOPED_TRACE(dir.string());
    const TokenizerFiles files{read_text_file(dir / "tokenizer.json"), read_if_exists(dir / "tokenizer_config.json"),
                               read_if_exists(dir / "config.json"), read_if_exists(dir / "generation_config.json")};
    std::string refused;  // a tokenizer nibble does not support is refused the same way from memory
    try {
      Tokenizer::load(dir);
    } catch (const std::exception& e) {
      refused = e.what();
    }
    if (!refused.empty()) {
      EXPECT_THROW(
          try { Tokenizer::from_files(files, dir); } catch (const std::exception& e) {
            EXPECT_EQ(std::string(e.what()), refused);
            throw;
          },
          std::exception);
      continue;
    }
    const Tokenizer disk = Tokenizer::load(dir);
    const Tokenizer memory = Tokenizer::from_files(files, dir);
    EXPECT_EQ(memory.vocab_size(), disk.vocab_size());
    EXPECT_EQ(memory.bos_id(), disk.bos_id());
    EXPECT_EQ(memory.eos_ids(), disk.eos_ids());
    for (const std::string& t : texts) {
      for (const bool bos : {false, true}) {
        const std::vector<int32_t> ids = disk.encode(t, bos);
        EXPECT_EQ(memory.encode(t, bos), ids) << t;
        EXPECT_EQ(memory.decode(ids), disk.decode(ids)) << t;
      }
    }
  }
}

// Errors from memory still name the file they come from.
TEST(TokenizerMemory, ErrorsNameTheFile) {
  const TokenizerFiles bad{"{not json", "", "", ""};
  try {
    Tokenizer::from_files(bad, "model.safetensors");
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors/tokenizer.json"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace nibble
