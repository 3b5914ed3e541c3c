#include "nibble/io/output_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "nibble/core/error.h"

namespace nibble {

namespace fs = std::filesystem;

namespace {

const char* kind_of(fs::file_type t) {
  switch (t) {
    case fs::file_type::directory: return "a folder";
    case fs::file_type::character: return "a character device";
    case fs::file_type::block: return "a block device";
    case fs::file_type::fifo: return "a FIFO";
    case fs::file_type::socket: return "a socket";
    case fs::file_type::symlink: return "a symbolic link";
    default: return "not a regular file";
  }
}

// A new, exclusively created temporary file beside `path` (mkstemp: no name an attacker can plant).
struct TempFile {
  std::string name;
  int fd = -1;

  explicit TempFile(const fs::path& path) {
    const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    std::error_code ec;
    check(fs::is_directory(dir, ec), path.string(), "the folder '{}' does not exist", dir.string());
    name = (dir / ("." + path.filename().string() + ".tmp-XXXXXX")).string();
    fd = mkstemp(name.data());
    check(fd >= 0, path.string(), "cannot create a file in the folder '{}': {}", dir.string(), std::strerror(errno));
  }
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!name.empty()) ::unlink(name.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
};

}  // namespace

void check_output_path(const fs::path& path, std::span<const fs::path> inputs) {
  const std::string where = path.string();
  check(!path.empty(), "output", "the output path is empty");
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(path, ec);
  if (fs::exists(st)) {
    check(fs::is_regular_file(st), where, "exists and is {}: nibble writes only regular files", kind_of(st.type()));
    for (const fs::path& in : inputs) {
      check(!fs::equivalent(path, in, ec), where, "is one of the inputs: choose another output path");
      check(!(fs::is_directory(in, ec) && fs::equivalent(path.parent_path().empty() ? "." : path.parent_path(), in, ec)),
            where, "would replace a file of the input folder '{}': choose another output path", in.string());
    }
  }
  TempFile probe(path);  // the folder is writable
}

void write_output_file(const fs::path& path, std::string_view bytes, std::span<const fs::path> inputs) {
  write_output_file(path, [bytes](const OutputSink& sink) { sink(bytes); }, inputs);
}

void write_output_file(const fs::path& path, const std::function<void(const OutputSink&)>& produce,
                       std::span<const fs::path> inputs) {
  check_output_path(path, inputs);
  const std::string where = path.string();
  TempFile tmp(path);
  const mode_t mask = umask(0);
  umask(mask);
  check(fchmod(tmp.fd, 0666 & ~mask) == 0, where, "cannot set the file mode: {}", std::strerror(errno));
  size_t written = 0;
  produce([&](std::string_view bytes) {
    for (size_t done = 0; done < bytes.size();) {
      const ssize_t n = ::write(tmp.fd, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      check(n > 0, where, "write failed after {} bytes: {}", written + done, std::strerror(errno));
      done += size_t(n);
    }
    written += bytes.size();
  });
  check(::fsync(tmp.fd) == 0, where, "write failed: {}", std::strerror(errno));
  const int fd = tmp.fd;
  tmp.fd = -1;
  check(::close(fd) == 0, where, "write failed: {}", std::strerror(errno));
  check(::rename(tmp.name.c_str(), path.c_str()) == 0, where, "cannot rename the finished file into place: {}",
        std::strerror(errno));
  tmp.name.clear();  // renamed: nothing to remove
}

}  // namespace nibble
