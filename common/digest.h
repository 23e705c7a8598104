// SHA-256 digests (OpenSSL), as lowercase hex.
#pragma once

#include <string>

#include "absl/strings/string_view.h"

namespace kiln {

std::string Sha256Hex(absl::string_view data);

// True for 64 lowercase hex characters.
bool IsSha256Hex(absl::string_view hex);

}  // namespace kiln
