#include "coordinator/rocks_status.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace kiln {

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsBusy() || s.IsTryAgain() || s.IsTimedOut()) return absl::UnavailableError(msg);
  if (s.IsNoSpace() || (s.IsIOError() && msg.find("No space left") != std::string::npos)) {
    return absl::ResourceExhaustedError(msg);
  }
  return absl::InternalError(msg);
}

bool IsDiskFull(const absl::Status& s) {
  return !s.ok() && (absl::StrContains(s.message(), std::strerror(ENOSPC)) ||
                     absl::StrContains(s.message(), std::strerror(EDQUOT)));
}

}  // namespace kiln
