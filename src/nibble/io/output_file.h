// Every file nibble writes (packed model, CSV, PNG, -o of any command) goes through here, so that
// no output destroys what is there: devices, FIFOs, folders and symbolic links are refused, an
// output that is one of the command's inputs is refused, and the bytes land in a temporary file
// in the same folder that is renamed over the target only when complete (removed on any failure).
#pragma once

#include <filesystem>
#include <functional>
#include <span>
#include <string_view>

namespace nibble {

// Throws nibble::Error unless `path` can be written safely: it is absent or a regular file (not
// a symbolic link), it is not one of `inputs` (a folder among them stands for every file in it),
// and its folder exists and is writable (tried by creating a temporary file). Commands call it
// before the work that produces the output, so a bad -o fails in seconds, not after hours.
void check_output_path(const std::filesystem::path& path, std::span<const std::filesystem::path> inputs = {});

// check_output_path, then writes `bytes` to a fresh temporary file beside `path` (mode 0666 less
// the umask), syncs it and renames it over `path`.
void write_output_file(const std::filesystem::path& path, std::string_view bytes,
                       std::span<const std::filesystem::path> inputs = {});

// The same for bytes made piece by piece: `produce` passes each piece, in order, to the sink it is
// given, so that a large file never sits in memory whole.
using OutputSink = std::function<void(std::string_view)>;
void write_output_file(const std::filesystem::path& path, const std::function<void(const OutputSink&)>& produce,
                       std::span<const std::filesystem::path> inputs = {});

}  // namespace nibble
