// What `kiln build` shows while its jobs run. Three forms:
//   - PlainView: a line per event and every log line (stderr not a terminal,
//     e.g. CI logs, or `--quiet`).
//   - TerminalView: like `nix build` on a terminal, a status line per
//     unfinished target (state, worker, elapsed, last log line) redrawn in
//     place, a permanent line per finished target, the full log above the
//     status lines with -L, colours unless NO_COLOR is set.
//   - JsonEventView (`--json`): one JSON object per event on stderr, for CI
//     to parse; stdout still carries only the final result.
// All are thread-safe: each job is watched on its own thread.
#pragma once

#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "kiln/v1/builds.pb.h"

namespace kiln {

class BuildView {
 public:
  virtual ~BuildView() = default;
  // Target `index` (its installable) was submitted as `job_id`.
  virtual void Submitted(size_t index, const std::string& job_id) = 0;
  // An event of target `index`'s job, as WatchJob streams it.
  virtual void Event(size_t index, const kiln::v1::JobEvent& event) = 0;
  // The watch of target `index` lost its stream and retries.
  virtual void Reconnecting(size_t index) = 0;
  // A line of the CLI's own (an error, the upload size, a result): shown
  // above any status lines.
  virtual void Message(const std::string& text) = 0;
  // Stops redrawing and leaves the screen clean (idempotent).
  virtual void Finish() {}
  // Stop drawing while something else talks to the user (the Ctrl-C
  // question), and start again.
  virtual void Pause() {}
  virtual void Resume() {}
};

// A job state as the CLI prints it ("queued", "succeeded", …).
const char* JobStateName(kiln::v1::JobState state);

// A duration as "m:ss", or "h:mm:ss" from an hour on.
std::string FormatElapsed(absl::Duration d);

// A build log line as every view and `kiln log` print it: "drv> text", or
// the text alone for Nix's own lines (like nix build -L).
std::string LogLineText(const kiln::v1::LogLine& line);

struct ViewOptions {
  bool quiet = false;             // No build log lines.
  bool print_build_logs = false;  // -L: the full log on a terminal too.
  bool color = false;
  int width = 80;             // Terminal columns.
  int max_status_lines = 10;  // More unfinished targets: a summary line.
};

std::unique_ptr<BuildView> MakePlainView(std::vector<std::string> installables, ViewOptions options, FILE* out);
// `quiet`: no `log` events (the others still come).
std::unique_ptr<BuildView> MakeJsonEventView(std::vector<std::string> installables, FILE* out, bool quiet = false);
// Redraws every `interval` from a thread of its own.
std::unique_ptr<BuildView> MakeTerminalView(std::vector<std::string> installables, ViewOptions options, FILE* out,
                                            absl::Duration interval = absl::Milliseconds(150));

// The terminal view's state and frame, apart from any terminal, for tests.
class StatusBoard {
 public:
  StatusBoard(std::vector<std::string> installables, ViewOptions options);

  void Submitted(size_t index, const std::string& job_id);
  // Returns the permanent lines the event produces (log lines with -L, the
  // final line of a finished target).
  std::vector<std::string> Event(size_t index, const kiln::v1::JobEvent& event, absl::Time now);
  void Reconnecting(size_t index);
  // The status lines as of `now`, each at most `width - 1` columns.
  std::vector<std::string> Frame(absl::Time now) const;

 private:
  struct Target {
    std::string installable;
    std::string job_id;
    std::string state = "submitting";
    std::string detail;  // Queue reason, "reconnecting", ….
    std::string worker;
    std::string last_line;
    absl::Time since = absl::InfinitePast();  // Start of the current state.
    bool finished = false;
  };
  std::string Colored(const std::string& state, const std::string& text) const;

  std::vector<Target> targets_;
  ViewOptions options_;
};

}  // namespace kiln
