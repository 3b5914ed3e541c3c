// Reading user-supplied JSON (config.json, a packed file's metadata): every failure is a
// nibble::Error naming the field, never a nlohmann::json exception or a silent conversion.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "nibble/core/error.h"

namespace nibble {

// Parses JSON text; a syntax error names the byte, and a number past double's range (nlohmann's
// out_of_range 406, e.g. 0.8e99999) is an error too, not an escaping exception.
inline nlohmann::json parse_json(std::string_view text, const std::string& where) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(where, fmt::format("not valid JSON (byte {}): {}", e.byte, e.what()));
  } catch (const nlohmann::json::exception& e) {
    throw Error(where, fmt::format("not valid JSON: {}", e.what()));
  }
}

// The value `v` of field `key` as T. Integers must be JSON integers within T's range (nlohmann
// would truncate 1.5, and converting 1e30 to an integer is undefined).
template <typename T>
T json_as(const nlohmann::json& v, const std::string& key, const std::string& where) {
  bool fits = false;
  if constexpr (std::is_same_v<T, bool>) {
    fits = v.is_boolean();
  } else if constexpr (std::is_integral_v<T>) {
    if (v.is_number_unsigned()) fits = v.get<uint64_t>() <= uint64_t(std::numeric_limits<T>::max());
    else if (v.is_number_integer())
      fits = v.get<int64_t>() >= int64_t(std::numeric_limits<T>::min()) &&
             (std::is_unsigned_v<T> || v.get<int64_t>() <= int64_t(std::numeric_limits<T>::max()));
  } else if constexpr (std::is_floating_point_v<T>) {
    fits = v.is_number() && (v.get<double>() == 0 || std::abs(v.get<double>()) <= std::numeric_limits<T>::max());
  } else {
    fits = v.is_string();
  }
  check(fits, where, "field '{}' has the wrong type or is out of range: {}", key, v.dump());
  return v.get<T>();
}

// Field `key` of object `j`; a required one must be present and not null.
template <typename T>
T json_field(const nlohmann::json& j, const std::string& key, const std::string& where) {
  check(j.is_object() && j.contains(key) && !j[key].is_null(), where, "missing required field '{}'", key);
  return json_as<T>(j[key], key, where);
}

template <typename T>
T json_field_or(const nlohmann::json& j, const std::string& key, T fallback, const std::string& where) {
  if (!j.is_object() || !j.contains(key) || j[key].is_null()) return fallback;
  return json_as<T>(j[key], key, where);
}

}  // namespace nibble
