#include "common/image_ref.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace kiln {

std::string ImageRef::ToString() const {
  return absl::StrCat(registry, "/", repository, tag.empty() ? "" : ":", tag);
}

absl::StatusOr<ImageRef> ParseImageRef(const std::string& text) {
  const size_t slash = text.find('/');
  if (slash == std::string::npos || slash == 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' does not name a registry (host/repository:tag)"));
  }
  ImageRef ref;
  ref.registry = text.substr(0, slash);
  std::string rest = text.substr(slash + 1);
  if (rest.find('@') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "': push to a tag, not a digest"));
  }
  const size_t colon = rest.rfind(':');
  if (colon != std::string::npos) {
    ref.tag = rest.substr(colon + 1);
    rest = rest.substr(0, colon);
  }
  ref.repository = rest;
  const auto valid_repo = [](const std::string& r) {
    if (r.empty() || r.front() == '/' || r.back() == '/') return false;
    for (char c : r) {
      if (!(absl::ascii_islower(c) || absl::ascii_isdigit(c) || c == '/' || c == '.' || c == '_' || c == '-')) {
        return false;
      }
    }
    return true;
  };
  if (!valid_repo(ref.repository)) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "': '", ref.repository,
                                                   "' is not a repository name (lower-case, digits, . _ - /)"));
  }
  for (char c : ref.tag) {
    if (!(absl::ascii_isalnum(c) || c == '_' || c == '.' || c == '-')) {
      return absl::InvalidArgumentError(absl::StrCat("'", text, "': '", ref.tag, "' is not a tag"));
    }
  }
  if (ref.tag.size() > 128) return absl::InvalidArgumentError(absl::StrCat("'", text, "': the tag is too long"));
  return ref;
}

}  // namespace kiln
