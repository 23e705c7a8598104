// Image references as pushes name them: "host[:port]/repository[:tag]".
// The registry host is required: Kiln has no default registry.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace kiln {

struct ImageRef {
  std::string registry;    // host[:port]
  std::string repository;  // e.g. sanmarcsoft/svc
  std::string tag;         // empty when not given
  std::string ToString() const;
};

absl::StatusOr<ImageRef> ParseImageRef(const std::string& text);

}  // namespace kiln
