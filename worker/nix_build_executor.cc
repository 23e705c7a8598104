#include "worker/nix_build_executor.h"

#include <deque>
#include <memory>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "common/installable.h"
#include "common/nix_log.h"

namespace kiln {
namespace {

// How many of the last output lines explain a failure when Nix printed no
// error message of its own (e.g. it was killed).
constexpr size_t kTailLines = 20;
constexpr absl::Duration kCancelGrace = absl::Seconds(10);

}  // namespace

std::vector<std::string> NixBuildExecutor::BuildArgv(const BuildRequest& request) const {
  std::vector<std::string> argv = {
      options_.nix_binary, "build", "--extra-experimental-features", "nix-command flakes",
      "--json", "--no-link", "--log-format", "internal-json",
  };
  for (const auto& [name, value] : options_.options) {
    argv.insert(argv.end(), {"--option", name, value});
  }
  if (request.spec.has_timeout() && request.spec.timeout().seconds() > 0) {
    argv.insert(argv.end(), {"--timeout", absl::StrCat(request.spec.timeout().seconds())});
  }
  if (request.spec.has_max_silent_time() && request.spec.max_silent_time().seconds() > 0) {
    argv.insert(argv.end(), {"--max-silent-time", absl::StrCat(request.spec.max_silent_time().seconds())});
  }
  // After the options: one argument naming a local path flake, so nothing in
  // the attribute can be read as an option.
  argv.push_back(absl::StrCat("path:", request.flake_dir, "#", request.attr));
  return argv;
}

absl::StatusOr<BuildExecutor::BuildId> NixBuildExecutor::Start(const BuildRequest& request,
                                                               LineCallback on_line, DoneCallback on_done) {
  if (absl::Status s = ValidateAttrPath(request.attr); !s.ok()) return s;
  if (request.flake_dir.empty() || request.flake_dir[0] != '/') {
    return absl::InvalidArgumentError("flake directory must be absolute");
  }
  ProcessSpec spec;
  spec.argv = BuildArgv(request);
  spec.cwd = request.flake_dir;

  // State shared by the two callbacks; both run on the supervisor's thread.
  struct Progress {
    NixLogParser parser;
    std::deque<std::string> tail;
    absl::Time started = absl::Now();
  };
  auto progress = std::make_shared<Progress>();
  auto line_cb = [progress, on_line = std::move(on_line)](absl::string_view raw) mutable {
    std::optional<NixLogEvent> event = progress->parser.ParseLine(raw);
    if (!event) return;
    kiln::v1::LogLine line;
    line.set_derivation(event->derivation);
    line.set_text(event->text);
    *line.mutable_time() = ToProtoTime(absl::Now());
    progress->tail.push_back(event->text);
    if (progress->tail.size() > kTailLines) progress->tail.pop_front();
    on_line(std::move(line));
  };
  // The id is only known after Spawn; the exit callback reads it through this.
  auto id_slot = std::make_shared<ProcessSupervisor::ProcessId>(0);
  auto exit_cb = [this, progress, id_slot, on_done = std::move(on_done)](ExitInfo exit,
                                                                         std::string stdout_data) mutable {
    kiln::v1::BuildResult result;
    *result.mutable_build_duration() = ToProtoDuration(absl::Now() - progress->started);
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      cancelled = cancelled_.erase(*id_slot) > 0;
    }
    if (cancelled) {
      result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
      result.set_error_message("build cancelled");
    } else if (exit.Success()) {
      absl::StatusOr<std::vector<NixBuiltPath>> built = ParseNixBuildJson(stdout_data);
      if (!built.ok() || built->empty()) {
        result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
        result.set_error_message(built.ok() ? "nix build reported no output" : std::string(built.status().message()));
      } else {
        result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
        result.set_drv_path(built->front().drv_path);
        for (const auto& [name, path] : built->front().outputs) (*result.mutable_outputs())[name] = path;
      }
    } else {
      const auto& errors = progress->parser.errors();
      std::string message = errors.empty() ? absl::StrJoin(progress->tail, "\n") : absl::StrJoin(errors, "\n");
      if (message.empty()) message = absl::StrCat("nix build failed (", exit.ToString(), ")");
      // Nix enforces --timeout and --max-silent-time per derivation and says
      // "timed out after N seconds [of silence]".
      result.set_code(absl::StrContains(message, "timed out after") ? kiln::v1::RESULT_CODE_TIMED_OUT
                                                                      : kiln::v1::RESULT_CODE_BUILD_FAILED);
      result.set_error_message(std::move(message));
    }
    std::move(on_done)(std::move(result));
  };
  // Hold the lock across Spawn so a fast exit cannot read the id slot before
  // it is written.
  absl::MutexLock lock(&mu_);
  absl::StatusOr<ProcessSupervisor::ProcessId> id = supervisor_.Spawn(spec, std::move(line_cb), std::move(exit_cb));
  if (!id.ok()) return id.status();
  *id_slot = *id;
  return *id;
}

void NixBuildExecutor::Cancel(BuildId id) {
  // Nix runs each builder in a session of its own: SIGTERM lets Nix kill
  // them; SIGKILL follows if it does not exit in time. Only a build that was
  // still running is reported as cancelled (and its mark is removed by its
  // exit callback, which takes mu_ after this returns).
  absl::MutexLock lock(&mu_);
  if (supervisor_.Terminate(id, kCancelGrace)) cancelled_.insert(id);
}

}  // namespace kiln
