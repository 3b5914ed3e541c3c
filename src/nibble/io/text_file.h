// Reading whole text files for evaluation and calibration: UTF-8 is checked up front so a bad
// file fails with its byte offset instead of tokenizing into garbage.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

namespace nibble {

// Offset of the first byte that is not part of a valid UTF-8 sequence, or npos.
size_t find_invalid_utf8(std::string_view s);

// Reads the file; throws nibble::Error naming the file and offset when it is unreadable or not UTF-8.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace nibble
