// Shared test helpers: where the reference data lives, and a clean skip when it is absent.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

namespace nibble::test {

// NIBBLE_DATA, or ../shared/data beside the source checkout.
inline std::filesystem::path data_dir() {
  if (const char* env = std::getenv("NIBBLE_DATA"); env && *env) return env;
  return std::filesystem::path(NIBBLE_SOURCE_DIR) / ".." / "shared" / "data";
}

inline std::filesystem::path source_dir() { return NIBBLE_SOURCE_DIR; }

}  // namespace nibble::test

// Skips the current test with a message when a file or folder of the reference data is missing.
#define NIBBLE_REQUIRE_DATA(relpath)                                                          \
  do {                                                                                        \
    if (!std::filesystem::exists(::nibble::test::data_dir() / (relpath)))                     \
      GTEST_SKIP() << "reference data not found: " << (::nibble::test::data_dir() / (relpath)) \
                   << " (set NIBBLE_DATA to the shared/data folder)";                         \
  } while (0)
