// NixBuildExecutor: the innermost BuildExecutor, and the only one that runs
// Nix. Nix runs as child process groups (never through a shell); its
// internal-json log becomes lines and its --json output the result.
//
// Besides the job's `nix build path:DIR#ATTR` it runs the steps the layers
// above ask for (BuildRequest::step): an evaluation (`nix path-info
// --derivation`), a build of given .drv files (`--rebuild` to check held
// outputs), and a build whose derivation is handed over later: Nix takes
// ~20 ms to start (it loads ~60 shared libraries), so that build's
// `nix build --file FIFO` starts at once and waits on a named pipe until it
// is handed `import /nix/store/….drv` (Nix's own way to turn a .drv into a
// value), or is stopped when the hand-over is withdrawn.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/derivation.h"
#include "common/nix_log.h"
#include "common/subprocess.h"
#include "worker/build_executor.h"
#include "worker/build_threads.h"

namespace kiln {

struct NixOptions {
  std::string nix_binary = "nix";
  // How many derivations this worker's builds may build at once, all
  // together (the worker's slots, `--max-jobs`); each build's Nix gets a
  // share as its `--max-jobs` (see NixMaxJobsGrant).
  int max_jobs = 1;
  // Each derivation's `--cores` (NIX_BUILD_CORES); 0: Nix's default (all).
  int cores = 0;
  // Passed as `--option NAME VALUE` to every build, e.g. {"substituters", ""}.
  std::vector<std::pair<std::string, std::string>> options;
  // When set, what each Nix command is given instead of `options`, worked
  // out from them as it starts (the farm store's relay adds itself as a
  // substituter once it knows the farm's key). May block briefly.
  std::function<std::vector<std::pair<std::string, std::string>>(
      const std::vector<std::pair<std::string, std::string>>&)>
      adjust_options;
  // Where the named pipes of handed-over builds are made.
  std::string scratch_dir = "/tmp";
  // Where the running Nix processes are listed (see ProcessSupervisor), so
  // that a worker started after a crash stops what the last one left
  // running; empty: not listed.
  std::string process_ledger_dir;
};

// The `--max-jobs` a build's Nix is given when it starts: the worker's
// free derivation slots (`max_jobs` less those `granted` to running builds)
// split evenly among the `waiting` builds starting now (this one counted),
// and at least 1, so a build alone on the worker uses every slot and builds
// started together share them. A build keeps its grant until it ends.
int NixMaxJobsGrant(int max_jobs, int granted, int waiting);

// The default `--cores` of each derivation: the CPUs shared evenly by the
// `max_jobs` derivations a worker builds at once, at least 1.
int DefaultCoresPerDerivation(int cpus, int max_jobs);

class NixBuildExecutor final : public BuildExecutor {
 public:
  explicit NixBuildExecutor(NixOptions options)
      : options_(std::move(options)), supervisor_(options_.process_ledger_dir) {}
  // Cancels what still runs and waits for every build's thread to end.
  ~NixBuildExecutor() override;

  // The first path `nix path-info --derivation` printed, when it is a plain
  // .drv store path (it becomes part of a Nix expression: `import DRV`).
  static absl::StatusOr<std::string> DerivationPrinted(absl::string_view printed);

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override
      ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(BuildId id) override ABSL_LOCKS_EXCLUDED(mu_);

  // The argv of the single-step build (exposed for tests: no shell, the
  // installable is one argument after the options).
  // `max_jobs`: the build's grant of derivation slots (0: no `--max-jobs`).
  std::vector<std::string> BuildArgv(const BuildRequest& request, int max_jobs = 0) const;

 private:
  struct Run;
  // One Nix process of a build.
  struct NixRun {
    ExitInfo exit;
    std::string stdout_data;
    NixLogParser parser;
    std::string tail_text;  // Its last lines, for failures without an error.
    bool cancelled = false;
    // While running:
    bool started = false;
    ProcessSupervisor::ProcessId id = 0;
    absl::Notification exited;
    std::deque<std::string> tail;
    std::atomic<bool> forward_lines{true};  // A handed-over build's: only once handed over.
  };

  // `max_jobs` > 0: a command that builds, given `--max-jobs` and `--cores`.
  std::vector<std::string> NixArgv(absl::string_view command, int max_jobs = 0) const;
  // The build's share of the derivation slots, granted on its first call
  // (or the share of the build it runs for, BuildRequest::share_slots_of).
  int SlotsOf(Run& run) ABSL_LOCKS_EXCLUDED(mu_);
  // Starts one Nix command for `run`, its log going to the build's lines;
  // false (with `out` saying why) when it did not start.
  bool StartNix(Run& run, const std::vector<std::string>& argv, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits for a started command to end (no-op for one that did not start).
  void WaitNix(Run& run, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  void RunNix(Run& run, const std::vector<std::string>& argv, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  void Execute(const std::shared_ptr<Run>& run) ABSL_LOCKS_EXCLUDED(mu_);
  // BuildRequest::Step::kEvaluate.
  void Evaluate(Run& run, kiln::v1::BuildResult& result);
  // kFlakeAttr with a hand-over; the last Nix run goes in `build`.
  void BuildHandedOver(Run& run, NixRun& build, kiln::v1::BuildResult& result);
  // Gives a waiting build its input.
  absl::Status HandOver(const std::string& fifo, NixRun& build, absl::string_view text);

  const NixOptions options_;
  ProcessSupervisor supervisor_;
  absl::Mutex mu_;
  BuildId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int granted_slots_ ABSL_GUARDED_BY(mu_) = 0;  // Sum of the running builds' grants.
  absl::flat_hash_map<BuildId, std::shared_ptr<Run>> runs_ ABSL_GUARDED_BY(mu_);
  // Last: destroyed first, so no build's thread outlives what it uses.
  BuildThreads threads_;
};

}  // namespace kiln
