#include "common/daemon.h"

#include <pthread.h>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace kiln {

sigset_t BlockTerminationSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  return signals;
}

int AwaitTerminationSignal(const sigset_t& signals) {
  int sig = 0;
  sigwait(&signals, &sig);
  return sig;
}

absl::Status ApplyLogLevel(absl::string_view level) {
  LogLevel parsed;
  if (!ParseLogLevel(level, &parsed)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad --log-level '", level, "': want debug, info, warning or error"));
  }
  SetMinLogLevel(parsed);
  return absl::OkStatus();
}

absl::Status ApplyLogFormat(absl::string_view format) {
  if (format == "text") {
    SetLogFormat(LogFormat::kText);
  } else if (format == "json") {
    SetLogFormat(LogFormat::kJson);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("bad --log-format '", format, "': want text or json"));
  }
  return absl::OkStatus();
}

}  // namespace kiln
