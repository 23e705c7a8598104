#include "cli/build_view.h"

#include <algorithm>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/cli_args.h"
#include "common/clock.h"
#include "common/grpc_util.h"

namespace kiln {
namespace {

using kiln::v1::JobEvent;

// At most `columns` characters of `text` (UTF-8 aware), control characters
// and escape sequences made harmless: a status line must never wrap or
// move the cursor.
std::string Fit(absl::string_view text, size_t columns) {
  std::string out;
  size_t used = 0;
  for (size_t i = 0; i < text.size() && used < columns;) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    size_t len = 1;
    if (c >= 0xF0)
      len = 4;
    else if (c >= 0xE0)
      len = 3;
    else if (c >= 0xC0)
      len = 2;
    if (c < 0x20 || c == 0x7F) {
      out.push_back(' ');
    } else {
      out.append(text.data() + i, std::min(len, text.size() - i));
    }
    i += len;
    ++used;
  }
  return out;
}

class PlainView final : public BuildView {
 public:
  PlainView(std::vector<std::string> installables, ViewOptions options, FILE* out)
      : installables_(std::move(installables)), options_(options), job_ids_(installables_.size()), out_(out) {}

  void Submitted(size_t index, const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    job_ids_[index] = job_id;
  }

  void Event(size_t index, const JobEvent& event) override {
    if (options_.quiet) return;
    const std::string& job = event.job_id();
    switch (event.kind_case()) {
      case JobEvent::kQueued:
        if (event.queued().reason().empty()) {
          Line(absl::StrFormat("kiln: %s: queued as job %s", installables_[index], job));
        } else if (event.queued().attempt() == 0) {
          Line(absl::StrFormat("kiln: %s: queued as job %s (%s)", installables_[index], job, event.queued().reason()));
        } else {
          Line(absl::StrFormat("kiln: job %s: queued again (%s)", job, event.queued().reason()));
        }
        break;
      case JobEvent::kAssigned:
        Line(absl::StrFormat("kiln: job %s: building on %s (attempt %d)", job, event.assigned().worker(),
                             event.assigned().attempt()));
        break;
      case JobEvent::kLog: {
        std::string text;
        if (event.log().dropped_lines() > 0) {
          absl::StrAppendFormat(&text, "kiln: job %s: %d log lines skipped (output too fast)\n", job,
                                event.log().dropped_lines());
        }
        for (const auto& line : event.log().lines()) absl::StrAppend(&text, LogLineText(line), "\n");
        Write(text);
        break;
      }
      default: break;
    }
  }

  void Reconnecting(size_t index) override {
    if (options_.quiet) return;
    std::string job;
    {
      absl::MutexLock lock(&mu_);
      job = job_ids_[index];
    }
    Line(absl::StrFormat("kiln: job %s: reconnecting to the coordinator…", job));
  }

  void Message(const std::string& text) override { Line(text); }

 private:
  // Events quote names from the coordinator (targets, workers, reasons):
  // their control characters are shown, not acted on.
  void Line(const std::string& text) { Write(TerminalSafe(text) + "\n"); }
  void Write(const std::string& text) {
    absl::MutexLock lock(&mu_);
    std::fwrite(text.data(), 1, text.size(), out_);
    std::fflush(out_);
  }

  const std::vector<std::string> installables_;
  const ViewOptions options_;
  absl::Mutex mu_;
  std::vector<std::string> job_ids_ ABSL_GUARDED_BY(mu_);
  FILE* const out_ ABSL_PT_GUARDED_BY(mu_);
};

class JsonEventView final : public BuildView {
 public:
  JsonEventView(std::vector<std::string> installables, FILE* out, bool quiet)
      : installables_(std::move(installables)), quiet_(quiet), out_(out) {}

  void Submitted(size_t index, const std::string& job_id) override {
    Emit({{"event", "submitted"}, {"installable", installables_[index]}, {"jobId", job_id}}, absl::Now());
  }

  void Event(size_t index, const JobEvent& event) override {
    const absl::Time time = event.has_time() ? FromProtoTime(event.time()) : absl::Now();
    const std::string& job = event.job_id();
    const std::string& installable = installables_[index];
    switch (event.kind_case()) {
      case JobEvent::kQueued:
        Emit({{"event", "queued"},
              {"installable", installable},
              {"jobId", job},
              {"attempt", event.queued().attempt()},
              {"reason", event.queued().reason()}},
             time);
        break;
      case JobEvent::kAssigned:
        Emit({{"event", "assigned"},
              {"installable", installable},
              {"jobId", job},
              {"worker", event.assigned().worker()},
              {"attempt", event.assigned().attempt()}},
             time);
        break;
      case JobEvent::kStarted:
        Emit({{"event", "started"}, {"installable", installable}, {"jobId", job}, {"worker", event.started().worker()}},
             time);
        break;
      case JobEvent::kLog:
        if (quiet_) break;
        if (event.log().dropped_lines() > 0) {
          Emit({{"event", "logDropped"}, {"jobId", job}, {"lines", event.log().dropped_lines()}}, time);
        }
        for (const auto& line : event.log().lines()) {
          Emit({{"event", "log"}, {"jobId", job}, {"derivation", line.derivation()}, {"text", line.text()}},
               line.has_time() ? FromProtoTime(line.time()) : time);
        }
        break;
      case JobEvent::kFinished: {
        const auto& f = event.finished();
        nlohmann::ordered_json j = {
            {"event", "finished"},
            {"installable", installable},
            {"jobId", job},
            {"status", f.result().cached() ? "cached" : JobStateName(f.state())},
            {"worker", f.worker()},
            {"durationSeconds", absl::ToDoubleSeconds(FromProtoDuration(f.result().build_duration()))}};
        if (!f.result().error_message().empty()) j["error"] = f.result().error_message();
        if (!f.result().pushed_manifest_digest().empty())
          j["pushedManifestDigest"] = f.result().pushed_manifest_digest();
        Emit(std::move(j), time);
        break;
      }
      case JobEvent::KIND_NOT_SET: break;
    }
  }

  void Reconnecting(size_t index) override {
    Emit({{"event", "reconnecting"}, {"installable", installables_[index]}}, absl::Now());
  }

  void Message(const std::string& text) override { Emit({{"event", "message"}, {"text", text}}, absl::Now()); }

 private:
  void Emit(nlohmann::ordered_json j, absl::Time time) {
    nlohmann::ordered_json line = {{"time", FormatTimestamp(time)}};
    line.update(j);
    std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    text.push_back('\n');
    absl::MutexLock lock(&mu_);
    std::fwrite(text.data(), 1, text.size(), out_);
    std::fflush(out_);
  }

  const std::vector<std::string> installables_;
  const bool quiet_;
  absl::Mutex mu_;
  FILE* const out_ ABSL_PT_GUARDED_BY(mu_);
};

class TerminalView final : public BuildView {
 public:
  TerminalView(std::vector<std::string> installables, ViewOptions options, FILE* out, absl::Duration interval)
      : board_(std::move(installables), options), out_(out), interval_(interval) {
    thread_ = std::thread([this] {
      while (!stop_.WaitForNotificationWithTimeout(interval_)) Draw(/*final=*/false);
    });
  }
  ~TerminalView() override { Finish(); }

  void Submitted(size_t index, const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    board_.Submitted(index, job_id);
  }

  void Event(size_t index, const JobEvent& event) override {
    absl::MutexLock lock(&mu_);
    for (std::string& line : board_.Event(index, event, absl::Now())) pending_.push_back(std::move(line));
  }

  void Reconnecting(size_t index) override {
    absl::MutexLock lock(&mu_);
    board_.Reconnecting(index);
  }

  void Message(const std::string& text) override {
    absl::MutexLock lock(&mu_);
    pending_.push_back(TerminalSafe(text));
    if (finished_) Flush(TakePending());  // Nothing draws any more.
  }

  void Finish() override {
    if (!stop_.HasBeenNotified()) stop_.Notify();
    if (thread_.joinable()) thread_.join();
    Draw(/*final=*/true);
    absl::MutexLock lock(&mu_);
    finished_ = true;
  }

  void Pause() override {
    absl::MutexLock lock(&mu_);
    paused_ = true;
    std::string out;
    Erase(out);
    Flush(out);
  }

  void Resume() override {
    absl::MutexLock lock(&mu_);
    paused_ = false;
  }

 private:
  // Moves to where the status lines began and clears them.
  void Erase(std::string& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (drawn_ > 0) absl::StrAppend(&out, "\r\x1b[", drawn_, "A\x1b[J");
    drawn_ = 0;
  }

  void Flush(const std::string& out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::fwrite(out.data(), 1, out.size(), out_);
    std::fflush(out_);
  }

  std::string TakePending() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::string out;
    for (const std::string& line : pending_) absl::StrAppend(&out, line, "\n");
    pending_.clear();
    return out;
  }

  // Permanent lines first, then (unless final) the status lines below them.
  void Draw(bool final) {
    absl::MutexLock lock(&mu_);
    if (paused_ && !final) return;
    std::string out;
    Erase(out);
    out += TakePending();
    if (!final) {
      for (const std::string& line : board_.Frame(absl::Now())) {
        absl::StrAppend(&out, line, "\n");
        ++drawn_;
      }
    }
    Flush(out);
  }

  absl::Mutex mu_;
  StatusBoard board_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> pending_ ABSL_GUARDED_BY(mu_);
  int drawn_ ABSL_GUARDED_BY(mu_) = 0;
  bool paused_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  FILE* const out_;
  const absl::Duration interval_;
  absl::Notification stop_;
  std::thread thread_;  // Last: started once the rest exists.
};

}  // namespace

const char* JobStateName(kiln::v1::JobState state) {
  switch (state) {
    case kiln::v1::JOB_STATE_QUEUED: return "queued";
    case kiln::v1::JOB_STATE_ASSIGNED: return "assigned";
    case kiln::v1::JOB_STATE_RUNNING: return "running";
    case kiln::v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case kiln::v1::JOB_STATE_FAILED: return "failed";
    case kiln::v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

std::string FormatElapsed(absl::Duration d) {
  const int64_t s = std::max<int64_t>(0, absl::ToInt64Seconds(d));
  if (s >= 3600) return absl::StrFormat("%d:%02d:%02d", s / 3600, (s / 60) % 60, s % 60);
  return absl::StrFormat("%d:%02d", s / 60, s % 60);
}

std::string LogLineText(const kiln::v1::LogLine& line) {
  return line.derivation().empty() ? line.text() : absl::StrCat(line.derivation(), "> ", line.text());
}

StatusBoard::StatusBoard(std::vector<std::string> installables, ViewOptions options) : options_(options) {
  for (std::string& i : installables) {
    Target t;
    t.installable = std::move(i);
    targets_.push_back(std::move(t));
  }
}

void StatusBoard::Submitted(size_t index, const std::string& job_id) {
  targets_[index].job_id = job_id;
  targets_[index].state = "submitted";
}

void StatusBoard::Reconnecting(size_t index) { targets_[index].detail = "reconnecting to the coordinator"; }

std::vector<std::string> StatusBoard::Event(size_t index, const JobEvent& event, absl::Time now) {
  Target& t = targets_[index];
  std::vector<std::string> permanent;
  t.detail.clear();
  switch (event.kind_case()) {
    case JobEvent::kQueued:
      t.state = "queued";
      t.detail = event.queued().reason();
      t.worker.clear();
      t.since = now;
      break;
    case JobEvent::kAssigned:
      t.state = "starting";
      t.worker = event.assigned().worker();
      t.since = now;
      break;
    case JobEvent::kStarted:
      t.state = "building";
      if (!event.started().worker().empty()) t.worker = event.started().worker();
      break;
    case JobEvent::kLog:
      if (t.state != "building") t.state = "building";
      for (const auto& line : event.log().lines()) {
        t.last_line = LogLineText(line);
        if (options_.print_build_logs && !options_.quiet) permanent.push_back(t.last_line);
      }
      break;
    case JobEvent::kFinished: {
      const auto& f = event.finished();
      t.finished = true;
      t.state = f.result().cached() ? "cached" : JobStateName(f.state());
      std::string where = f.worker().empty() ? "" : absl::StrCat(" on ", f.worker());
      const absl::Duration duration = FromProtoDuration(f.result().build_duration());
      const std::string took = f.result().cached() || duration <= absl::ZeroDuration()
                                   ? ""
                                   : absl::StrFormat(", %.1fs", absl::ToDoubleSeconds(duration));
      const std::string text = absl::StrCat(t.installable, " (job ", t.job_id, where, took, ")");
      permanent.push_back(absl::StrCat(
          Colored(t.state, absl::StrFormat("%-10s", t.state)), " ",
          Fit(TerminalSafe(text, /*multiline=*/false), static_cast<size_t>(std::max(options_.width - 12, 10)))));
      break;
    }
    case JobEvent::KIND_NOT_SET: break;
  }
  return permanent;
}

std::string StatusBoard::Colored(const std::string& state, const std::string& text) const {
  if (!options_.color) return text;
  const char* code = "0";
  if (state == "succeeded" || state == "cached")
    code = "32";
  else if (state == "failed")
    code = "31";
  else if (state == "cancelled")
    code = "35";
  else if (state == "queued" || state == "submitted" || state == "submitting")
    code = "33";
  else if (state == "building" || state == "starting")
    code = "36";
  return absl::StrCat("\x1b[", code, "m", text, "\x1b[0m");
}

std::vector<std::string> StatusBoard::Frame(absl::Time now) const {
  std::vector<std::string> lines;
  size_t unfinished = 0, shown = 0, queued = 0, building = 0;
  // "STATE      TEXT": ten columns, a space, the rest less one (a line that
  // fills the last column wraps on some terminals).
  const size_t room = static_cast<size_t>(std::max(options_.width - 12, 10));
  for (const Target& t : targets_) {
    if (t.finished) continue;
    ++unfinished;
    if (t.state == "queued" || t.state == "submitted") ++queued;
    if (t.state == "building" || t.state == "starting") ++building;
    if (shown >= static_cast<size_t>(options_.max_status_lines)) continue;
    ++shown;
    std::vector<std::string> parts = {t.installable};
    if (!t.worker.empty()) parts.push_back(t.worker);
    if (t.since != absl::InfinitePast()) parts.push_back(FormatElapsed(now - t.since));
    if (!t.detail.empty()) {
      parts.push_back(t.detail);
    } else if (!t.last_line.empty()) {
      parts.push_back(t.last_line);
    }
    lines.push_back(absl::StrCat(Colored(t.state, absl::StrFormat("%-10s", t.state)), " ",
                                 Fit(TerminalSafe(absl::StrJoin(parts, "  "), /*multiline=*/false), room)));
  }
  if (unfinished > shown) {
    lines.push_back(Fit(absl::StrFormat("… and %d more (%d unfinished: %d queued, %d building)", unfinished - shown,
                                        unfinished, queued, building),
                        static_cast<size_t>(std::max(options_.width - 1, 10))));
  }
  return lines;
}

std::unique_ptr<BuildView> MakePlainView(std::vector<std::string> installables, ViewOptions options, FILE* out) {
  return std::make_unique<PlainView>(std::move(installables), options, out);
}

std::unique_ptr<BuildView> MakeJsonEventView(std::vector<std::string> installables, FILE* out, bool quiet) {
  return std::make_unique<JsonEventView>(std::move(installables), out, quiet);
}

std::unique_ptr<BuildView> MakeTerminalView(std::vector<std::string> installables, ViewOptions options, FILE* out,
                                            absl::Duration interval) {
  return std::make_unique<TerminalView>(std::move(installables), options, out, interval);
}

}  // namespace kiln
