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
#include "common/derivation.h"
#include "common/grpc_util.h"
#include "common/hash_mismatch.h"
#include "common/installable.h"
#include "worker/fod_outcomes.h"
#include "worker/nix_store_validity.h"
#include "common/status_macros.h"

namespace kiln {

using kiln::v1::FodVerdict;

namespace {

// How many of the last output lines explain a failure when Nix printed no
// error message of its own (e.g. it was killed).
constexpr size_t kTailLines = 20;
constexpr absl::Duration kCancelGrace = absl::Seconds(10);

std::string FormatTime(const google::protobuf::Timestamp& t) {
  return absl::FormatTime("%Y-%m-%d %H:%M UTC", FromProtoTime(t), absl::UTCTimeZone());
}

}  // namespace

struct NixBuildExecutor::Run {
  BuildId id = 0;
  BuildRequest request;
  LineCallback on_line;
  DoneCallback on_done;
  absl::Time started;
  // Both guarded by the executor's mu_.
  bool cancelled = false;
  int slots = 0;                                        // Its grant of derivation slots; 0 until its first build.
  std::vector<ProcessSupervisor::ProcessId> processes;  // Running now.
};

NixBuildExecutor::~NixBuildExecutor() {
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, run] : runs_) {
      run->cancelled = true;
      for (ProcessSupervisor::ProcessId p : run->processes) supervisor_.Terminate(p, kCancelGrace);
    }
    mu_.Await(absl::Condition(
        +[](absl::flat_hash_map<BuildId, std::shared_ptr<Run>>* runs) { return runs->empty(); }, &runs_));
  }
  // Every build's thread has done its work; let them return before the
  // state they were using goes.
  JoinEndedThreads();
}

void NixBuildExecutor::JoinEndedThreads() {
  std::vector<std::thread> ended;
  {
    absl::MutexLock lock(&mu_);
    for (BuildId id : ended_) {
      auto it = threads_.find(id);
      ended.push_back(std::move(it->second));
      threads_.erase(it);
    }
    ended_.clear();
  }
  for (std::thread& t : ended) t.join();
}

int NixMaxJobsGrant(int max_jobs, int granted, int waiting) {
  return std::max(1, (max_jobs - granted) / std::max(1, waiting));
}

int DefaultCoresPerDerivation(int cpus, int max_jobs) { return std::max(1, cpus / std::max(1, max_jobs)); }

int NixBuildExecutor::SlotsOf(Run& run) {
  absl::MutexLock lock(&mu_);
  if (run.slots == 0) {
    const int waiting = static_cast<int>(
        std::count_if(runs_.begin(), runs_.end(), [](const auto& entry) { return entry.second->slots == 0; }));
    run.slots = NixMaxJobsGrant(options_.max_jobs, granted_slots_, waiting);
    granted_slots_ += run.slots;
  }
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
  for (const auto& [name, value] : options_.options) {
    argv.insert(argv.end(), {"--option", name, value});
  }
  return argv;
}

std::vector<std::string> NixBuildExecutor::BuildArgv(const BuildRequest& request, int max_jobs) const {
  std::vector<std::string> argv = NixArgv("build", max_jobs);
  argv.insert(argv.end(), {"--json", "--no-link"});
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
  RETURN_IF_ERROR(ValidateAttrPath(request.attr));
  if (request.flake_dir.empty() || request.flake_dir[0] != '/') {
    return absl::InvalidArgumentError("flake directory must be absolute");
  }
  auto run = std::make_shared<Run>();
  run->request = request;
  run->on_line = std::move(on_line);
  run->on_done = std::move(on_done);
  run->started = absl::Now();
  JoinEndedThreads();
  absl::MutexLock lock(&mu_);
  run->id = next_id_++;
  runs_[run->id] = run;
  // A thread per build: its steps wait on Nix and on the coordinator in
  // turn. Joined once it has ended (by a later Start or the destructor), so
  // none runs on after the executor.
  threads_.emplace(run->id, std::thread([this, run] { Execute(run); }));
  return run->id;
}

void NixBuildExecutor::Cancel(BuildId id) {
  // Nix runs each builder in a session of its own: SIGTERM lets Nix kill
  // them; SIGKILL follows if it does not exit in time.
  absl::MutexLock lock(&mu_);
  auto it = runs_.find(id);
  if (it == runs_.end()) return;
  it->second->cancelled = true;
  for (ProcessSupervisor::ProcessId p : it->second->processes) supervisor_.Terminate(p, kCancelGrace);
}

void NixBuildExecutor::Record(Run& run, const std::vector<kiln::v1::FodOutcome>& outcomes) {
  if (outcomes.empty()) return;
  // The cache learns less; the build's own result stands.
  if (absl::Status s = options_.fods->Record(outcomes, run.request.job_id); !s.ok()) {
    Line(run, absl::StrCat("could not record FOD results: ", s.message()));
  }
}

absl::StatusOr<absl::flat_hash_set<std::string>> NixBuildExecutor::ValidPaths(
    const std::vector<std::string>& paths) const {
  return QueryValidPaths(NixStoreBinaryBeside(options_.nix_binary), options_.options, paths);
}

std::vector<kiln::v1::FodOutcome> NixBuildExecutor::Harvest(Run& run, const ClosureIndex& index,
                                                            const NixLogParser& parser, absl::string_view source,
                                                            kiln::v1::BuildResult& result) {
  std::string note;
  std::vector<kiln::v1::FodOutcome> outcomes = HarvestFods(
      index, parser, source, [this](const std::vector<std::string>& paths) { return ValidPaths(paths); }, result,
      &note);
  if (!note.empty()) Line(run, note);
  return outcomes;
}

void NixBuildExecutor::Line(Run& run, absl::string_view text) {
  kiln::v1::LogLine line;
  line.set_text(absl::StrCat("kiln: ", text));
  *line.mutable_time() = ToProtoTime(absl::Now());
  run.on_line(std::move(line));
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

void NixBuildExecutor::ComputeFods(Run& run, const std::vector<ClosureFod>& fods, const ClosureIndex& index,
                                   kiln::v1::BuildResult& result) {
  // The FODs asked for; those whose output is here are rebuilt (Nix would
  // otherwise trust them), the others built.
  std::vector<const ClosureFod*> targets;
  std::vector<std::string> held, missing;
  for (const std::string& drv : run.request.spec.fod_task().drv_paths()) {
    const ClosureFod* fod = index.Find(drv);
    if (fod == nullptr || fod->drv_path != drv) {
      result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
      result.set_error_message(absl::StrCat(drv, " is not a fixed-output derivation of this closure"));
      return;
    }
    targets.push_back(fod);
  }
  // Nix decides what is here: a directory a failed or interrupted build left
  // at the output path is not (`--rebuild` would refuse it; a build replaces
  // it).
  std::vector<std::string> outputs;
  for (const ClosureFod* fod : targets) outputs.push_back(fod->fod.output_path);
  absl::StatusOr<absl::flat_hash_set<std::string>> valid = ValidPaths(outputs);
  if (!valid.ok()) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(std::string(valid.status().message()));
    return;
  }
  for (const ClosureFod* fod : targets) {
    (valid->contains(fod->fod.output_path) ? held : missing).push_back(fod->drv_path);
  }
  std::vector<kiln::v1::FodOutcome> outcomes;
  kiln::v1::BuildResult found;
  std::vector<std::string> errors;
  for (const auto* group : {&held, &missing}) {
    if (group->empty()) continue;
    NixRun nix;
    std::vector<std::string> argv = NixArgv("build", SlotsOf(run));
    argv.insert(argv.end(), {"--keep-going", "--no-link"});
    if (group == &held) argv.push_back("--rebuild");
    argv.insert(argv.end(), group->begin(), group->end());
    Line(run, absl::StrCat(group == &held ? "rebuilding " : "building ", group->size(),
                           " fixed-output derivation(s) to compute their hashes"));
    RunNix(run, argv, nix);
    if (nix.cancelled) return;
    std::vector<kiln::v1::FodOutcome> got = Harvest(run, index, nix.parser, "build", found);
    outcomes.insert(outcomes.end(), got.begin(), got.end());
    for (const std::string& e : nix.parser.errors()) {
      if (ParseHashMismatches(e).empty()) errors.push_back(e);
    }
  }
  Record(run, outcomes);
  bool all = true;
  for (const ClosureFod* fod : targets) {
    kiln::v1::FodReport* r = result.add_fod_reports();
    *r = ReportOf(*fod);
    for (const auto& o : outcomes) {
      if (o.fod().drv_path() == fod->drv_path) r->set_correct(o.got());
    }
    r->set_verdict(r->correct().empty() ? "failed" : "computed");
    r->set_source("computed");
    r->set_computed_by_job(run.request.job_id);
    all = all && !r->correct().empty();
  }
  result.set_code(all ? kiln::v1::RESULT_CODE_SUCCEEDED : kiln::v1::RESULT_CODE_BUILD_FAILED);
  if (!all)
    result.set_error_message(errors.empty() ? "a fixed-output derivation failed to build"
                                            : absl::StrJoin(errors, "\n"));
}

void NixBuildExecutor::Execute(const std::shared_ptr<Run>& run) {
  kiln::v1::BuildResult result;
  if (options_.fods == nullptr && run->request.spec.fod_task().mode() != kiln::v1::FodTask::MODE_BUILD) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message("this worker has no FOD cache to work with");
  } else if (options_.fods == nullptr) {
    NixRun build;
    RunNix(*run, BuildArgv(run->request, SlotsOf(*run)), build);
    if (!build.cancelled) {
      if (build.exit.Success()) {
        SetBuilt(build.stdout_data, result);
      } else {
        SetFailure(build.exit, build.parser, build.tail_text, result);
      }
    }
  } else {
    // Step 5's process starts now and waits on a named pipe (see the header).
    std::string dir = (std::filesystem::path(options_.scratch_dir) / "kiln-build-XXXXXX").string();
    if (::mkdtemp(dir.data()) == nullptr) {
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(
          absl::StrCat("cannot make a directory in ", options_.scratch_dir, ": ", std::strerror(errno)));
    } else {
      const std::string fifo = dir + "/drv.nix";
      NixRun build;
      if (::mkfifo(fifo.c_str(), 0600) != 0) {
        result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
        result.set_error_message(absl::StrCat("cannot make ", fifo, ": ", std::strerror(errno)));
      } else {
        std::vector<std::string> argv = BuildArgv(run->request, SlotsOf(*run));
        argv.back() = "--keep-going";
        argv.insert(argv.end(), {"--file", fifo});
        build.forward_lines.store(false);  // Nothing to show until handed over.
        // FOD tasks build no .drv of their own: no process to wait for one.
        if (run->request.spec.fod_task().mode() == kiln::v1::FodTask::MODE_BUILD) StartNix(*run, argv, build);
        BuildWithFodChecks(*run, build, fifo, result);
        if (build.started && !build.exited.HasBeenNotified() && build.forward_lines.load() == false) {
          // Never handed a derivation: it is still waiting on the pipe.
          supervisor_.Kill(build.id);
        }
        WaitNix(*run, build);
      }
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
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
  granted_slots_ -= run->slots;
  runs_.erase(run->id);
  ended_.push_back(run->id);
}

void NixBuildExecutor::BuildWithFodChecks(Run& run, NixRun& build, const std::string& fifo,
                                          kiln::v1::BuildResult& result) {
  FodOracle* const oracle = options_.fods;
  const std::string& job_id = run.request.job_id;

  // 1. Evaluate once: the .drv, and with it the closure's .drv files.
  NixRun eval;
  std::vector<std::string> eval_argv = NixArgv("path-info");
  eval_argv.push_back("--derivation");
  eval_argv.push_back(absl::StrCat("path:", run.request.flake_dir, "#", run.request.attr));
  RunNix(run, eval_argv, eval);
  if (eval.cancelled) return;
  if (!eval.exit.Success()) return SetFailure(eval.exit, eval.parser, eval.tail_text, result);
  std::vector<absl::string_view> printed = absl::StrSplit(eval.stdout_data, '\n', absl::SkipWhitespace());
  const std::string drv = printed.empty() ? "" : std::string(absl::StripAsciiWhitespace(printed.back()));
  // It becomes part of a Nix expression (`import DRV`): a store path only.
  const bool plain_path = std::all_of(drv.begin(), drv.end(), [](char c) {
    return absl::ascii_isalnum(c) || (c != '\0' && std::strchr("/+._?=-", c) != nullptr);
  });
  if (!absl::StartsWith(drv, "/") || !absl::EndsWith(drv, ".drv") || !plain_path) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(
        absl::StrCat("nix path-info --derivation printed no derivation: '", eval.stdout_data.substr(0, 200), "'"));
    return;
  }

  // 2. The closure's FODs, looked up in one call. Kiln's own trouble here
  // (an unreadable .drv, the cache unreachable) never stops a build.
  std::vector<ClosureFod> fods;
  if (absl::StatusOr<std::vector<ClosureFod>> found = FixedOutputsOfClosure(drv); found.ok()) {
    fods = *std::move(found);
  } else {
    Line(run, absl::StrCat("FOD checks skipped: ", found.status().message()));
  }
  std::vector<FodVerdict> verdicts;
  if (!fods.empty()) {
    std::vector<kiln::v1::FodRef> refs;
    for (const ClosureFod& f : fods) refs.push_back(RefOf(f));
    if (absl::StatusOr<std::vector<FodVerdict>> v = oracle->Check(refs, job_id); v.ok()) {
      verdicts = *std::move(v);
    } else {
      Line(run, absl::StrCat("FOD cache unavailable (", v.status().message(), "); building without FOD checks"));
    }
  }
  const ClosureIndex index(fods);
  switch (run.request.spec.fod_task().mode()) {
    case kiln::v1::FodTask::MODE_SCAN: return ReportFods(fods, verdicts, result);
    case kiln::v1::FodTask::MODE_COMPUTE: return ComputeFods(run, fods, index, result);
    default: break;
  }

  // 3. Hashes the cache knows to be wrong: fail now, build nothing.
  std::vector<size_t> suspects;
  size_t counts[5] = {0, 0, 0, 0, 0};
  std::vector<std::string> messages;
  for (size_t i = 0; i < verdicts.size(); ++i) {
    const FodVerdict& v = verdicts[i];
    ++counts[std::min<size_t>(static_cast<size_t>(v.kind()), 4)];
    if (v.kind() == FodVerdict::KIND_WRONG) {
      kiln::v1::HashMismatch* m = result.add_hash_mismatches();
      m->set_drv_path(fods[i].drv_path);
      m->set_name(fods[i].fod.name);
      m->set_specified(fods[i].fod.declared.Sri());
      m->set_got(v.entry().hash());
      m->set_source("cache");
      m->set_computed_by_job(v.entry().computed_by_job());
      m->set_computed_by_worker(v.entry().computed_by_worker());
      messages.push_back(DescribeMismatch(*m, FormatTime(v.entry().first_computed())));
    } else if (v.kind() == FodVerdict::KIND_SUSPECT_STALE) {
      suspects.push_back(i);
    }
  }
  // Only a suspect whose output Nix holds needs a check of its own: the
  // build below computes and checks the others (and replaces what a failed
  // build may have left at their paths).
  if (!suspects.empty()) {
    std::vector<std::string> outputs;
    for (size_t i : suspects) outputs.push_back(fods[i].fod.output_path);
    absl::StatusOr<absl::flat_hash_set<std::string>> valid = ValidPaths(outputs);
    if (!valid.ok()) {
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(std::string(valid.status().message()));
      return;
    }
    std::erase_if(suspects, [&](size_t i) { return !valid->contains(fods[i].fod.output_path); });
  }
  for (const ClosureFod& f : fods) {
    if (TakesWholeFlakeSource(f)) {
      Line(run, absl::StrCat("note: FOD '", f.fod.name, "' takes the whole flake source as an input: every edit of ",
                             "the flake changes its inputs and needs its hash computed again; give it only the ",
                             "files it needs (e.g. the lockfile)"));
    }
  }
  if (!verdicts.empty()) {
    Line(run,
         absl::StrCat(verdicts.size(), " fixed-output derivation(s) checked against the FOD cache: ",
                      counts[FodVerdict::KIND_RIGHT], " right, ", counts[FodVerdict::KIND_WRONG], " wrong, ",
                      counts[FodVerdict::KIND_SUSPECT_STALE], " suspect, ", counts[FodVerdict::KIND_NONDETERMINISTIC],
                      " nondeterministic, ", counts[FodVerdict::KIND_UNKNOWN], " unknown"));
  }
  if (!messages.empty()) {
    for (const auto& m : result.hash_mismatches()) {
      Line(run, absl::StrCat("FOD '", m.name(), "' declares ", m.specified(), "; its inputs produce ", m.got(),
                             " (known from the FOD cache: not built)"));
    }
    result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
    result.set_error_message(absl::StrJoin(messages, "\n"));
    return;
  }

  // 4. Suspected stale hashes whose output is here: rebuild to verify.
  if (!suspects.empty()) {
    NixRun check;
    std::vector<std::string> argv = NixArgv("build", SlotsOf(run));
    argv.insert(argv.end(), {"--rebuild", "--keep-going", "--no-link"});
    for (size_t i : suspects) {
      Line(run, absl::StrCat("verifying '", fods[i].fod.name, "': its hash ", fods[i].fod.declared.Sri(),
                             " was computed for other inputs (job ", verdicts[i].stale_source().computed_by_job(),
                             "); rebuilding the output held here"));
      argv.push_back(fods[i].drv_path);
    }
    RunNix(run, argv, check);
    if (check.cancelled) return;
    std::vector<kiln::v1::FodOutcome> outcomes = Harvest(run, index, check.parser, "check", result);
    Record(run, outcomes);
    if (result.hash_mismatches_size() > 0) {
      for (const auto& m : result.hash_mismatches()) messages.push_back(DescribeMismatch(m, ""));
      result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
      result.set_error_message(absl::StrJoin(messages, "\n"));
      return;
    }
    if (!check.exit.Success()) return SetFailure(check.exit, check.parser, check.tail_text, result);
  }

  // 5. The build itself, of the .drv evaluated above: hand it to the
  // waiting `nix build`.
  if (absl::Status s = HandOver(fifo, build, absl::StrCat("import ", drv, "\n")); !s.ok()) {
    WaitNix(run, build);
    if (build.cancelled) return;
    if (!build.exit.Success()) return SetFailure(build.exit, build.parser, build.tail_text, result);
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(std::string(s.message()));
    return;
  }
  WaitNix(run, build);
  if (build.cancelled) return;
  kiln::v1::BuildResult harvested;
  std::vector<kiln::v1::FodOutcome> outcomes = Harvest(run, index, build.parser, "build", harvested);
  if (build.exit.Success()) {
    SetBuilt(build.stdout_data, result);
  } else {
    SetFailure(build.exit, build.parser, build.tail_text, result);
  }
  // 6. What the build taught the cache.
  Record(run, outcomes);
  for (const auto& m : harvested.hash_mismatches()) {
    *result.add_hash_mismatches() = m;
    absl::StrAppend(result.mutable_error_message(), "\n", FixLine(m));
  }
}

}  // namespace kiln
