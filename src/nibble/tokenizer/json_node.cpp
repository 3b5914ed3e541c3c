#include "nibble/tokenizer/json_node.h"

#include "nibble/core/error.h"

namespace nibble::tokenizer {

void JsonNode::fail(const std::string& what) const {
  throw Error(*where_, path_.empty() ? what : path_ + ": " + what);
}

const nlohmann::json& JsonNode::object() const {
  if (!value_->is_object()) fail(fmt::format("expected an object, got {}", value_->type_name()));
  return *value_;
}

const nlohmann::json& JsonNode::array() const {
  if (!value_->is_array()) fail(fmt::format("expected an array, got {}", value_->type_name()));
  return *value_;
}

JsonNode JsonNode::at(std::string_view key) const {
  const auto& obj = object();
  const auto it = obj.find(key);
  const std::string child = path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  if (it == obj.end()) throw Error(*where_, fmt::format("{}: missing", child));
  return JsonNode(*it, child, *where_);
}

std::optional<JsonNode> JsonNode::find(std::string_view key) const {
  const auto& obj = object();
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  return JsonNode(*it, path_.empty() ? std::string(key) : path_ + "." + std::string(key), *where_);
}

JsonNode JsonNode::at(size_t index) const {
  const auto& arr = array();
  if (index >= arr.size()) fail(fmt::format("index {} is past the end ({} elements)", index, arr.size()));
  return JsonNode(arr[index], fmt::format("{}[{}]", path_, index), *where_);
}

std::string JsonNode::string() const {
  if (!value_->is_string()) fail(fmt::format("expected a string, got {}", value_->type_name()));
  return value_->get<std::string>();
}

bool JsonNode::boolean() const {
  if (!value_->is_boolean()) fail(fmt::format("expected true or false, got {}", value_->type_name()));
  return value_->get<bool>();
}

int64_t JsonNode::integer() const {
  if (!value_->is_number_integer()) fail(fmt::format("expected an integer, got {}", value_->type_name()));
  if (value_->is_number_unsigned() && value_->get<uint64_t>() > uint64_t(INT64_MAX)) fail("integer out of range");
  return value_->get<int64_t>();
}

double JsonNode::number() const {
  if (!value_->is_number()) fail(fmt::format("expected a number, got {}", value_->type_name()));
  return value_->get<double>();
}

bool JsonNode::boolean_or(std::string_view key, bool fallback) const {
  const auto member = find(key);
  return member ? member->boolean() : fallback;
}

}  // namespace nibble::tokenizer
