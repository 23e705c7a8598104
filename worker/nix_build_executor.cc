#include "worker/nix_build_executor.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <memory>
#include <optional>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/installable.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// How many of the last output lines explain a failure when Nix printed no
// error message of its own (e.g. it was killed).
constexpr size_t kTailLines = 20;
constexpr absl::Duration kCancelGrace = absl::Seconds(10);

}  // namespace

struct NixBuildExecutor::Run {
  BuildId id = 0;
  BuildRequest request;
  LineCallback on_line;
  DoneCallback on_done;
  absl::Time started;
  // All three guarded by the executor's mu_.
  bool cancelled = false;
  int slots = 0;                                        // Its share of derivation slots; 0 until its first build.
  bool granted = false;                                 // `slots` were granted to it (not shared with another build).
  std::vector<ProcessSupervisor::ProcessId> processes;  // Running now.

  // Whether it takes derivation slots of its own (evaluations take none).
  bool NeedsSlots() const { return request.step != BuildRequest::Step::kEvaluate && request.share_slots_of == 0; }
};

NixBuildExecutor::~NixBuildExecutor() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, run] : runs_) {
    run->cancelled = true;
    if (run->request.hand_over != nullptr) run->request.hand_over->Withdraw();
    for (ProcessSupervisor::ProcessId p : run->processes) supervisor_.Terminate(p, kCancelGrace);
  }
  mu_.Await(absl::Condition(
      +[](absl::flat_hash_map<BuildId, std::shared_ptr<Run>>* runs) { return runs->empty(); }, &runs_));
  // What remains of each build's thread returns at once; threads_ joins them.
}

int NixMaxJobsGrant(int max_jobs, int granted, int waiting) {
  return std::max(1, (max_jobs - granted) / std::max(1, waiting));
}

int DefaultCoresPerDerivation(int cpus, int max_jobs) { return std::max(1, cpus / std::max(1, max_jobs)); }

int NixBuildExecutor::SlotsOf(Run& run) {
  absl::MutexLock lock(&mu_);
  if (run.slots > 0) return run.slots;
  if (run.request.share_slots_of != 0) {
    auto owner = runs_.find(run.request.share_slots_of);
    if (owner != runs_.end() && owner->second->slots > 0) return run.slots = owner->second->slots;
  }
  const int waiting = static_cast<int>(std::count_if(runs_.begin(), runs_.end(), [](const auto& entry) {
    return entry.second->slots == 0 && entry.second->NeedsSlots();
  }));
  run.slots = NixMaxJobsGrant(options_.max_jobs, granted_slots_, std::max(1, waiting));
  run.granted = true;
  granted_slots_ += run.slots;
  return run.slots;
}

std::vector<std::string> NixBuildExecutor::NixArgv(absl::string_view command, int max_jobs) const {
  std::vector<std::string> argv = {
      options_.nix_binary,  std::string(command), "--extra-experimental-features",
      "nix-command flakes", "--log-format",       "internal-json",
  };
  // Before the operator's `--option`s, which may override them.
  if (max_jobs > 0) argv.insert(argv.end(), {"--max-jobs", absl::StrCat(max_jobs)});
  if (max_jobs > 0 && options_.cores > 0) argv.insert(argv.end(), {"--cores", absl::StrCat(options_.cores)});
  for (const auto& [name, value] :
       options_.adjust_options ? options_.adjust_options(options_.options) : options_.options) {
    argv.insert(argv.end(), {"--option", name, value});
  }
  return argv;
}

std::vector<std::string> NixBuildExecutor::BuildArgv(const BuildRequest& request, int max_jobs) const {
  std::vector<std::string> argv = NixArgv("build", max_jobs);
  argv.insert(argv.end(), {"--json", "--no-link"});
  if (request.keep_going) argv.push_back("--keep-going");
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

absl::StatusOr<BuildExecutor::BuildId> NixBuildExecutor::Start(const BuildRequest& request, LineCallback on_line,
                                                               DoneCallback on_done) {
  if (request.step == BuildRequest::Step::kDerivations) {
    if (request.drv_paths.empty()) return absl::InvalidArgumentError("no derivations to build");
    for (const std::string& drv : request.drv_paths) {
      if (!absl::StartsWith(drv, "/") || !absl::EndsWith(drv, ".drv")) {
        return absl::InvalidArgumentError(absl::StrCat("not a derivation: '", drv, "'"));
      }
    }
  } else {
    RETURN_IF_ERROR(ValidateAttrPath(request.attr));
  }
  if (request.flake_dir.empty() || request.flake_dir[0] != '/') {
    return absl::InvalidArgumentError("flake directory must be absolute");
  }
  auto run = std::make_shared<Run>();
  run->request = request;
  run->on_line = std::move(on_line);
  run->on_done = std::move(on_done);
  run->started = absl::Now();
  BuildId id;
  {
    absl::MutexLock lock(&mu_);
    id = run->id = next_id_++;
    runs_[id] = run;
  }
  // A thread per build: it waits on Nix (and on a hand-over) in turn.
  threads_.Start(id, [this, run] { Execute(run); });
  return id;
}

void NixBuildExecutor::Cancel(BuildId id) {
  // Nix runs each builder in a session of its own: SIGTERM lets Nix kill
  // them; SIGKILL follows if it does not exit in time.
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(id);
  if (it == runs_.end()) return;
  it->second->cancelled = true;
  if (it->second->request.hand_over != nullptr) it->second->request.hand_over->Withdraw();
  for (ProcessSupervisor::ProcessId p : it->second->processes) supervisor_.Terminate(p, kCancelGrace);
}

bool NixBuildExecutor::StartNix(Run& run, const std::vector<std::string>& argv, NixRun& out) {
  ProcessSpec spec;
  spec.argv = argv;
  spec.cwd = run.request.flake_dir;
  // Both callbacks run on the supervisor's thread, the exit one last, while
  // the build's thread owns `out` and waits for it in WaitNix.
  auto line_cb = [&run, &out](absl::string_view raw) {
    std::optional<NixLogEvent> event = out.parser.ParseLine(raw);
    if (!event || !out.forward_lines.load()) return;
    kiln::v1::LogLine line;
    line.set_derivation(event->derivation);
    line.set_text(event->text);
    *line.mutable_time() = ToProtoTime(absl::Now());
    out.tail.push_back(event->text);
    if (out.tail.size() > kTailLines) out.tail.pop_front();
    run.on_line(std::move(line));
  };
  auto exit_cb = [&out](ExitInfo exit, std::string stdout_data) {
    out.exit = exit;
    out.stdout_data = std::move(stdout_data);
    out.exited.Notify();
  };
  absl::MutexLock lock(&mu_);
  if (run.cancelled) {
    out.cancelled = true;
    return false;
  }
  absl::StatusOr<ProcessSupervisor::ProcessId> id = supervisor_.Spawn(spec, std::move(line_cb), std::move(exit_cb));
  if (!id.ok()) {
    out.exit = ExitInfo{};
    out.tail_text = absl::StrCat("cannot run ", argv[0], ": ", id.status().message());
    return false;
  }
  out.id = *id;
  out.started = true;
  run.processes.push_back(*id);
  return true;
}

void NixBuildExecutor::WaitNix(Run& run, NixRun& out) {
  if (!out.started) return;
  out.exited.WaitForNotification();
  out.started = false;
  absl::MutexLock lock(&mu_);
  run.processes.erase(std::remove(run.processes.begin(), run.processes.end(), out.id), run.processes.end());
  out.cancelled = run.cancelled;
  out.tail_text = absl::StrJoin(out.tail, "\n");
}

void NixBuildExecutor::RunNix(Run& run, const std::vector<std::string>& argv, NixRun& out) {
  if (StartNix(run, argv, out)) WaitNix(run, out);
}

namespace {

// The result of a Nix command that failed: its errors, else its last lines.
void SetFailure(const ExitInfo& exit, const NixLogParser& parser, const std::string& tail,
                kiln::v1::BuildResult& result) {
  const auto& errors = parser.errors();
  std::string message = errors.empty() ? tail : absl::StrJoin(errors, "\n");
  if (message.empty()) message = absl::StrCat("nix failed (", exit.ToString(), ")");
  // Nix enforces --timeout and --max-silent-time per derivation and says
  // "timed out after N seconds [of silence]".
  result.set_code(absl::StrContains(message, "timed out after") ? kiln::v1::RESULT_CODE_TIMED_OUT
                                                                : kiln::v1::RESULT_CODE_BUILD_FAILED);
  result.set_error_message(std::move(message));
}

void SetBuilt(const std::string& stdout_data, kiln::v1::BuildResult& result) {
  absl::StatusOr<std::vector<NixBuiltPath>> built = ParseNixBuildJson(stdout_data);
  if (!built.ok() || built->empty()) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(built.ok() ? "nix build reported no output" : std::string(built.status().message()));
    return;
  }
  result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  result.set_drv_path(built->front().drv_path);
  for (const auto& [name, path] : built->front().outputs) (*result.mutable_outputs())[name] = path;
}

// Opens the named pipe `fifo` for writing once the waiting `nix build -f`
// has opened it for reading (before that, opening fails with ENXIO: nothing
// is lost, as a pipe nobody reads would drop what was written), writes
// `text` and closes it, which ends the file for Nix.
absl::Status HandOverText(const std::string& fifo, const absl::Notification& exited, absl::string_view text) {
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  for (;;) {
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
      // Shorter than PIPE_BUF into an empty pipe: written whole at once.
      const ssize_t n = ::write(fd, text.data(), text.size());
      const int write_errno = errno;
      ::close(fd);
      if (n != static_cast<ssize_t>(text.size())) {
        return absl::InternalError(absl::StrCat("cannot write to ", fifo, ": ", std::strerror(write_errno)));
      }
      return absl::OkStatus();
    }
    if (errno != ENXIO && errno != EINTR) {
      return absl::InternalError(absl::StrCat("cannot open ", fifo, ": ", std::strerror(errno)));
    }
    if (exited.HasBeenNotified()) return absl::InternalError("nix build ended before it was given the derivation");
    if (absl::Now() > deadline) return absl::DeadlineExceededError("nix build did not open its input in 60 s");
    absl::SleepFor(absl::Milliseconds(1));
  }
}

}  // namespace

absl::Status NixBuildExecutor::HandOver(const std::string& fifo, NixRun& build, absl::string_view text) {
  if (!build.started) return absl::InternalError(absl::StrCat("nix build did not start: ", build.tail_text));
  build.forward_lines.store(true);
  return HandOverText(fifo, build.exited, text);
}

absl::StatusOr<std::string> NixBuildExecutor::DerivationPrinted(absl::string_view printed) {
  std::vector<absl::string_view> lines = absl::StrSplit(printed, '\n', absl::SkipWhitespace());
  const std::string drv = lines.empty() ? "" : std::string(absl::StripAsciiWhitespace(lines.back()));
  const bool plain_path = std::all_of(drv.begin(), drv.end(), [](char c) {
    return absl::ascii_isalnum(c) || (c != '\0' && std::strchr("/+._?=-", c) != nullptr);
  });
  if (!absl::StartsWith(drv, "/") || !absl::EndsWith(drv, ".drv") || !plain_path) {
    return absl::InternalError(
        absl::StrCat("nix path-info --derivation printed no derivation: '", printed.substr(0, 200), "'"));
  }
  return drv;
}

void NixBuildExecutor::Evaluate(Run& run, kiln::v1::BuildResult& result) {
  NixRun eval;
  std::vector<std::string> argv = NixArgv("path-info");
  argv.push_back("--derivation");
  argv.push_back(absl::StrCat("path:", run.request.flake_dir, "#", run.request.attr));
  RunNix(run, argv, eval);
  if (eval.cancelled) return;
  if (!eval.exit.Success()) return SetFailure(eval.exit, eval.parser, eval.tail_text, result);
  absl::StatusOr<std::string> drv = DerivationPrinted(eval.stdout_data);
  if (!drv.ok()) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(std::string(drv.status().message()));
    return;
  }
  result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  result.set_drv_path(*drv);
}

void NixBuildExecutor::BuildHandedOver(Run& run, NixRun& build, kiln::v1::BuildResult& result) {
  std::string dir = (std::filesystem::path(options_.scratch_dir) / "kiln-build-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(
        absl::StrCat("cannot make a directory in ", options_.scratch_dir, ": ", std::strerror(errno)));
    return;
  }
  const std::string fifo = dir + "/drv.nix";
  if (::mkfifo(fifo.c_str(), 0600) != 0) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(absl::StrCat("cannot make ", fifo, ": ", std::strerror(errno)));
  } else {
    // The installable's place takes the pipe: Nix builds what it reads there.
    std::vector<std::string> argv = BuildArgv(run.request, SlotsOf(run));
    argv.back() = "--file";
    argv.push_back(fifo);
    build.forward_lines.store(false);  // Nothing to show until handed over.
    StartNix(run, argv, build);
    const std::optional<std::string> drv = run.request.hand_over->Await();
    absl::Status handed = absl::CancelledError("no derivation was handed over");
    if (drv.has_value()) {
      handed = DerivationPrinted(*drv).status();
      if (handed.ok()) handed = HandOver(fifo, build, absl::StrCat("import ", *drv, "\n"));
    }
    if (!handed.ok() && build.started && !build.exited.HasBeenNotified() && !build.forward_lines.load()) {
      supervisor_.Kill(build.id);  // Still waiting on the pipe.
    }
    WaitNix(run, build);
    if (build.cancelled) {
      // Execute says so.
    } else if (handed.ok()) {
      if (build.exit.Success()) {
        SetBuilt(build.stdout_data, result);
      } else {
        SetFailure(build.exit, build.parser, build.tail_text, result);
      }
    } else if (absl::IsCancelled(handed)) {
      result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
      result.set_error_message(std::string(handed.message()));
    } else if (!build.exit.Success()) {
      SetFailure(build.exit, build.parser, build.tail_text, result);  // Why it ended before it was handed over.
    } else {
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(std::string(handed.message()));
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

void NixBuildExecutor::Execute(const std::shared_ptr<Run>& run) {
  kiln::v1::BuildResult result;
  NixRun nix;  // The run whose messages the report gives.
  const BuildRequest& request = run->request;
  switch (request.step) {
    case BuildRequest::Step::kEvaluate: Evaluate(*run, result); break;
    case BuildRequest::Step::kDerivations: {
      std::vector<std::string> argv = NixArgv("build", SlotsOf(*run));
      argv.push_back("--no-link");
      if (request.keep_going) argv.push_back("--keep-going");
      if (request.rebuild) argv.push_back("--rebuild");
      argv.insert(argv.end(), request.drv_paths.begin(), request.drv_paths.end());
      RunNix(*run, argv, nix);
      if (nix.cancelled) break;
      if (nix.exit.Success()) {
        result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
      } else {
        SetFailure(nix.exit, nix.parser, nix.tail_text, result);
      }
      break;
    }
    case BuildRequest::Step::kFlakeAttr:
      if (request.hand_over != nullptr) {
        BuildHandedOver(*run, nix, result);
        break;
      }
      RunNix(*run, BuildArgv(request, SlotsOf(*run)), nix);
      if (nix.cancelled) break;
      if (nix.exit.Success()) {
        SetBuilt(nix.stdout_data, result);
      } else {
        SetFailure(nix.exit, nix.parser, nix.tail_text, result);
      }
      break;
  }
  if (request.report != nullptr) {
    request.report->errors = nix.parser.errors();
    for (const NixBuildActivity& b : nix.parser.builds()) {
      if (b.stopped) request.report->built.push_back({b.drv_path, absl::ToDoubleSeconds(b.duration)});
    }
  }
  bool cancelled;
  {
    absl::MutexLock lock(&mu_);
    cancelled = run->cancelled;
  }
  if (cancelled) {
    result.Clear();
    result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
    result.set_error_message("build cancelled");
  }
  *result.mutable_build_duration() = ToProtoDuration(absl::Now() - run->started);
  std::move(run->on_done)(std::move(result));
  absl::MutexLock lock(&mu_);
  if (run->granted) granted_slots_ -= run->slots;
  runs_.erase(run->id);
}

}  // namespace kiln
