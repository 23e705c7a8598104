// What both daemons' main() do around their server: take SIGINT/SIGTERM
// synchronously (blocked before any thread starts, then awaited) and set the
// log level from a flag.
#pragma once

#include <csignal>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// Blocks SIGINT and SIGTERM in the calling thread (threads started later
// inherit the mask) and ignores SIGPIPE. Call first thing in main().
sigset_t BlockTerminationSignals();

// Waits for SIGINT or SIGTERM; returns which.
int AwaitTerminationSignal(const sigset_t& signals);

// Applies --log-level ("debug", "info", "warning", "error").
absl::Status ApplyLogLevel(absl::string_view level);
// Applies --log-format ("text" or "json").
absl::Status ApplyLogFormat(absl::string_view format);

}  // namespace kiln
