// Small helpers for the addresses daemons listen on and dial.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct HostPort {
  std::string host;  // Without brackets for IPv6.
  int port = 0;
};

// Parses "host:port", "[v6]:port". Port 0 is allowed (pick a free one).
absl::StatusOr<HostPort> ParseHostPort(absl::string_view address);

// "host:port", with brackets around an IPv6 host.
std::string FormatHostPort(absl::string_view host, int port);

// True for an IP literal in 127.0.0.0/8 or ::1, and for the exact name
// "localhost" when every address it resolves to is one of those: what may
// be dialled or served without TLS.
bool IsLoopbackHost(absl::string_view host);

// Writes `contents` to `path` atomically (a temporary file of its own beside
// it, then rename), so a reader never sees half of it: --ready-file, the
// worker's blob cache. On failure the temporary file is removed; a full disk
// is RESOURCE_EXHAUSTED. A process killed mid-write leaves its temporary
// file: IsAtomicWriteLeftover tells such files for a sweep at start.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

inline constexpr absl::string_view kAtomicWriteSuffix = ".kiln-tmp.";
bool IsAtomicWriteLeftover(absl::string_view file_name);

}  // namespace kiln
