#include "common/log.h"

#include <unistd.h>

#include <atomic>
#include <string>

#include <nlohmann/json.hpp>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/clock.h"

namespace kiln {
namespace {
std::atomic<int> min_level{static_cast<int>(LogLevel::kInfo)};
std::atomic<int> log_format{static_cast<int>(LogFormat::kText)};
constexpr const char* kTextNames[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};
constexpr const char* kJsonNames[] = {"debug", "info", "warning", "error"};
}  // namespace

void SetMinLogLevel(LogLevel level) { min_level = static_cast<int>(level); }
void SetLogFormat(LogFormat format) { log_format = static_cast<int>(format); }

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= min_level.load(std::memory_order_relaxed); }

bool ParseLogLevel(absl::string_view text, LogLevel* level) {
  if (text == "debug")
    *level = LogLevel::kDebug;
  else if (text == "info")
    *level = LogLevel::kInfo;
  else if (text == "warning" || text == "warn")
    *level = LogLevel::kWarning;
  else if (text == "error")
    *level = LogLevel::kError;
  else
    return false;
  return true;
}

std::string FormatLogLine(LogFormat format, absl::string_view time, LogLevel level, absl::string_view component,
                          const LogFields& fields, absl::string_view message) {
  const int l = static_cast<int>(level);
  if (format == LogFormat::kJson) {
    nlohmann::ordered_json j;
    j["time"] = time;
    j["level"] = kJsonNames[l];
    j["component"] = component;
    if (!fields.worker.empty()) j["worker"] = fields.worker;
    if (!fields.job.empty()) j["job"] = fields.job;
    if (fields.attempt > 0) j["attempt"] = fields.attempt;
    j["msg"] = message;
    // Build output and names may hold invalid UTF-8: replace, never throw.
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  std::string line = absl::StrCat(time, " ", kTextNames[l], " ", component, ": ");
  if (!fields.worker.empty()) absl::StrAppend(&line, "worker ", fields.worker, ": ");
  if (!fields.job.empty()) {
    absl::StrAppend(&line, "job ", fields.job);
    if (fields.attempt > 0) absl::StrAppend(&line, " attempt ", fields.attempt);
    absl::StrAppend(&line, ": ");
  }
  absl::StrAppend(&line, message);
  return line;
}

void LogLine(LogLevel level, absl::string_view component, const LogFields& fields, absl::string_view message) {
  if (static_cast<int>(level) < min_level) return;
  const std::string time = FormatTimestamp(absl::Now());
  std::string line = FormatLogLine(static_cast<LogFormat>(log_format.load(std::memory_order_relaxed)), time, level,
                                   component, fields, message);
  line.push_back('\n');
  (void)!::write(STDERR_FILENO, line.data(), line.size());
}

}  // namespace kiln
