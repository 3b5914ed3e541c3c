// Reading tokenizer.json with errors that name the file and the field
// ("tokenizer.json: model.merges[3]: 'x' is not in the vocab") instead of nlohmann's type errors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace nibble::tokenizer {

class JsonNode {
 public:
  JsonNode(const nlohmann::json& value, std::string path, const std::string& where)
      : value_(&value), path_(std::move(path)), where_(&where) {}

  JsonNode at(std::string_view key) const;                // a required member of an object
  std::optional<JsonNode> find(std::string_view key) const;  // absent or null -> nullopt
  JsonNode at(size_t index) const;                        // an array element

  bool is_string() const { return value_->is_string(); }
  bool is_array() const { return value_->is_array(); }
  bool is_object() const { return value_->is_object(); }

  const nlohmann::json& object() const;  // checked to be an object
  const nlohmann::json& array() const;   // checked to be an array
  std::string string() const;
  bool boolean() const;
  int64_t integer() const;
  double number() const;
  // A member that may be absent or null, with a default.
  bool boolean_or(std::string_view key, bool fallback) const;

  const std::string& path() const { return path_; }
  const std::string& where() const { return *where_; }
  [[noreturn]] void fail(const std::string& what) const;

 private:
  const nlohmann::json* value_;
  std::string path_;
  const std::string* where_;
};

}  // namespace nibble::tokenizer
