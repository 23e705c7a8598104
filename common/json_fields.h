// Reading fields of JSON from outside (Nix's logs, registries, files users
// edit) without exceptions: nlohmann's value() throws when a field exists
// with another type, which would take a daemon down on one odd line.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>

namespace kiln {

// j[key] when `j` is an object and that is a string; `fallback` otherwise.
inline std::string JsonString(const nlohmann::json& j, const char* key, std::string fallback = "") {
  if (!j.is_object()) return fallback;
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

// j[key] when it is an integer that fits T; `fallback` otherwise.
template <typename T>
T JsonInt(const nlohmann::json& j, const char* key, T fallback) {
  if (!j.is_object()) return fallback;
  auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (it->is_number_unsigned()) {
    const uint64_t v = it->get<uint64_t>();
    return v <= static_cast<uint64_t>(std::numeric_limits<T>::max()) ? static_cast<T>(v) : fallback;
  }
  if (it->is_number_integer()) {
    const int64_t v = it->get<int64_t>();
    if constexpr (std::is_unsigned_v<T>) {
      return v >= 0 && static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<T>::max())
                 ? static_cast<T>(v)
                 : fallback;
    } else {
      return v >= std::numeric_limits<T>::min() && v <= std::numeric_limits<T>::max() ? static_cast<T>(v) : fallback;
    }
  }
  return fallback;
}

}  // namespace kiln
