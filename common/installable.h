// Parsing what a user names on the command line: "PATH#ATTR", as `nix build`
// takes it for local flakes.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct Installable {
  std::string flake_dir;  // As given, e.g. "./services/api" or ".".
  std::string attr;       // e.g. "default", "packages.x86_64-linux.image".
};

// Splits "PATH#ATTR" (ATTR defaults to "default", as in Nix). PATH must be a
// local directory (no "github:" or other flake URL schemes); ATTR must be a
// dotted attribute path of Nix identifiers, never starting with '-', so it
// cannot be mistaken for an option.
absl::StatusOr<Installable> ParseInstallable(absl::string_view text);

// Validates a dotted attribute path (see ParseInstallable).
absl::Status ValidateAttrPath(absl::string_view attr);

}  // namespace kiln
