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

// True for 127.0.0.0/8, ::1 and "localhost".
bool IsLoopbackHost(absl::string_view host);

// Writes `contents` to `path` atomically (temporary file, then rename), so a
// reader polling for the file never sees half of it. Daemons use it for
// --ready-file: tests wait for it instead of sleeping.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

}  // namespace kiln
