#include "common/installable.h"

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace kiln {

absl::Status ValidateAttrPath(absl::string_view attr) {
  if (attr.empty()) return absl::InvalidArgumentError("empty attribute path");
  if (attr.size() > 512) return absl::InvalidArgumentError("attribute path longer than 512 characters");
  for (absl::string_view part : absl::StrSplit(attr, '.')) {
    bool ok = !part.empty() && (absl::ascii_isalpha(part[0]) || part[0] == '_');
    for (char c : part) {
      ok = ok && (absl::ascii_isalnum(c) || c == '_' || c == '-' || c == '\'');
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("invalid attribute path '", attr,
                       "': each dot-separated part must be a Nix identifier (letters, digits, _ - ')"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Installable> ParseInstallable(absl::string_view text) {
  Installable out;
  auto hash = text.find('#');
  absl::string_view path = text.substr(0, hash);
  out.attr = hash == absl::string_view::npos ? "default" : std::string(text.substr(hash + 1));
  if (path.empty()) path = ".";
  if (path.find(':') != absl::string_view::npos && !absl::StartsWith(path, "path:")) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "': only local flake directories can be built remotely (PATH#ATTR)"));
  }
  absl::ConsumePrefix(&path, "path:");
  out.flake_dir = std::string(path);
  RETURN_IF_ERROR(ValidateAttrPath(out.attr));
  return out;
}

}  // namespace kiln
