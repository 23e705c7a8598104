// Daemon logging: one line per event on stderr, either text
//   "2026-11-24T17:00:00.123Z INFO  worker: job 12 attempt 1: building"
// or, with --log-format=json, one JSON object per line
//   {"time":"2026-11-24T17:00:00.123Z","level":"info","component":"worker",
//    "job":"12","attempt":1,"msg":"building"}
// Thread-safe; each line is written with a single write call.
#pragma once

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kiln {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };
enum class LogFormat { kText, kJson };

void SetMinLogLevel(LogLevel level);
void SetLogFormat(LogFormat format);
// Parses "debug", "info", "warning", "error"; false on anything else.
bool ParseLogLevel(absl::string_view text, LogLevel* level);
// Whether lines of `level` are written (the helpers below format nothing
// otherwise: a filtered line costs no allocation on hot paths).
bool LogEnabled(LogLevel level);

// What a line is about, as separate fields in JSON (so a log pipeline can
// select one job's lines) and as a prefix of the message in text.
struct LogFields {
  absl::string_view job;
  int64_t attempt = 0;  // 0: none.
  absl::string_view worker;
};

inline LogFields ForJob(absl::string_view job, int64_t attempt = 0) {
  LogFields fields;
  fields.job = job;
  fields.attempt = attempt;
  return fields;
}
inline LogFields ForWorker(absl::string_view worker) {
  LogFields fields;
  fields.worker = worker;
  return fields;
}

void LogLine(LogLevel level, absl::string_view component, const LogFields& fields, absl::string_view message);
inline void LogLine(LogLevel level, absl::string_view component, absl::string_view message) {
  LogLine(level, component, LogFields{}, message);
}
// The line as written, without the newline (exposed for tests).
std::string FormatLogLine(LogFormat format, absl::string_view time, LogLevel level, absl::string_view component,
                          const LogFields& fields, absl::string_view message);

template <typename... Args>
void LogInfo(absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kInfo)) LogLine(LogLevel::kInfo, component, absl::StrCat(args...));
}
template <typename... Args>
void LogWarning(absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kWarning)) LogLine(LogLevel::kWarning, component, absl::StrCat(args...));
}
template <typename... Args>
void LogError(absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kError)) LogLine(LogLevel::kError, component, absl::StrCat(args...));
}
template <typename... Args>
void LogDebug(absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kDebug)) LogLine(LogLevel::kDebug, component, absl::StrCat(args...));
}

// The same, about a job or worker.
template <typename... Args>
void LogInfo(const LogFields& fields, absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kInfo)) LogLine(LogLevel::kInfo, component, fields, absl::StrCat(args...));
}
template <typename... Args>
void LogWarning(const LogFields& fields, absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kWarning)) LogLine(LogLevel::kWarning, component, fields, absl::StrCat(args...));
}
template <typename... Args>
void LogError(const LogFields& fields, absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kError)) LogLine(LogLevel::kError, component, fields, absl::StrCat(args...));
}
template <typename... Args>
void LogDebug(const LogFields& fields, absl::string_view component, const Args&... args) {
  if (LogEnabled(LogLevel::kDebug)) LogLine(LogLevel::kDebug, component, fields, absl::StrCat(args...));
}

}  // namespace kiln
