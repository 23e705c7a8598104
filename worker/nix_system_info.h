// What the local Nix can build: its system, extra platforms and system
// features, read from `nix show-config`.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct NixSystemInfo {
  std::vector<std::string> systems;   // `system` then `extra-platforms`.
  std::vector<std::string> features;  // `system-features`.
};

// Parses the text of `nix show-config` ("name = value" lines).
NixSystemInfo ParseNixShowConfig(absl::string_view text);

// Runs `nix show-config` and parses it.
absl::StatusOr<NixSystemInfo> QueryNixSystemInfo(const std::string& nix_binary = "nix");

}  // namespace kiln
