// A derivation as the serve protocol carries it, from what
// `nix show-derivation` prints of it (its JSON object for one .drv).
#pragma once

#include <nlohmann/json.hpp>

#include "common/serve_protocol.h"

namespace kiln::testing {

inline ServeDerivation ServeDerivationFromJson(const nlohmann::json& j) {
  ServeDerivation d;
  for (const auto& [name, out] : j["outputs"].items()) {
    d.outputs.push_back({.name = name, .path = out.value("path", ""), .hash_algo = "", .hash = ""});
  }
  for (const auto& src : j["inputSrcs"]) d.input_srcs.push_back(src);
  d.platform = j["system"];
  d.builder = j["builder"];
  for (const auto& a : j["args"]) d.args.push_back(a);
  for (const auto& [k, v] : j["env"].items()) d.env.emplace_back(k, v);
  return d;
}

}  // namespace kiln::testing
