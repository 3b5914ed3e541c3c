// nibble::Error — every failure on user input says what failed and where.
#pragma once

#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace nibble {

// `where` names the place: a file, a tensor, a byte offset, a line ("model.safetensors: tensor
// 'x' at byte 1234"). what() is "where: what" so the CLI can print it as one line.
class Error : public std::runtime_error {
 public:
  Error(std::string where, std::string what)
      : std::runtime_error(where.empty() ? what : where + ": " + what),
        where_(std::move(where)), what_(std::move(what)) {}
  explicit Error(std::string what) : Error(std::string(), std::move(what)) {}

  const std::string& where() const { return where_; }
  const std::string& reason() const { return what_; }

 private:
  std::string where_;
  std::string what_;
};

// Throws nibble::Error(where, fmt::format(...)) when `cond` is false: for checks on input data.
template <typename... Args>
inline void check(bool cond, const std::string& where, fmt::format_string<Args...> f, Args&&... args) {
  if (!cond) throw Error(where, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace nibble
