// NixBuildExecutor: BuildExecutor that runs real Nix as child process groups
// (never through a shell), turns its internal-json log into lines and its
// --json output into the result.
//
// With a FodOracle (the fleet's FOD hash cache) a build goes in steps:
//   1. nix path-info --derivation path:DIR#ATTR     evaluate once
//   2. read the closure's .drv files; look up every FOD in one call
//   3. a FOD the cache knows to be declared wrong (fake or stale hash) fails
//      the build at once, naming the right hash; nothing is built
//   4. a FOD suspected stale (its hash was computed for older inputs) whose
//      output this worker held is rebuilt (`nix build --rebuild`) to verify
//   5. the build of the evaluated .drv, with --keep-going
//   6. every FOD built, and every hash mismatch Nix reported, is recorded
// Nix takes ~20 ms to start (it loads ~60 shared libraries). So that steps 1
// and 5 do not pay it one after the other, step 5's `nix build -f FIFO` is
// started with step 1 and waits on a named pipe until it is handed
// `import /nix/store/….drv` (Nix's own way to turn a .drv into a value), or
// is stopped when the build ends earlier.
// Without an oracle, a build is the single `nix build path:DIR#ATTR`.
#pragma once

#include <atomic>
#include <deque>
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
#include "worker/fod_oracle.h"

namespace kiln {

class ClosureIndex;  // The FODs of one closure, by path.

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
  // The FOD hash cache; nullptr: builds run without FOD checks.
  FodOracle* fods = nullptr;
  // Where the named pipes of step 5 are made.
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
    std::atomic<bool> forward_lines{true};  // Step 5's: only once handed over.
  };

  // `max_jobs` > 0: a command that builds, given `--max-jobs` and `--cores`.
  std::vector<std::string> NixArgv(absl::string_view command, int max_jobs = 0) const;
  // The build's share of the derivation slots, granted on its first call.
  int SlotsOf(Run& run) ABSL_LOCKS_EXCLUDED(mu_);
  // Starts one Nix command for `run`, its log going to the build's lines;
  // false (with `out` saying why) when it did not start.
  bool StartNix(Run& run, const std::vector<std::string>& argv, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits for a started command to end (no-op for one that did not start).
  void WaitNix(Run& run, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  void RunNix(Run& run, const std::vector<std::string>& argv, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  void Execute(const std::shared_ptr<Run>& run) ABSL_LOCKS_EXCLUDED(mu_);
  // Joins the threads of builds that have ended.
  void JoinEndedThreads() ABSL_LOCKS_EXCLUDED(mu_);
  // Steps 1–6 above; `build` is step 5's process, started already and
  // waiting on the named pipe `fifo`.
  void BuildWithFodChecks(Run& run, NixRun& build, const std::string& fifo, kiln::v1::BuildResult& result);
  // FodTask::MODE_COMPUTE: builds the FODs asked for and reports their hashes.
  void ComputeFods(Run& run, const std::vector<ClosureFod>& fods, const ClosureIndex& index,
                   kiln::v1::BuildResult& result);
  // Gives step 5's process its input.
  absl::Status HandOver(const std::string& fifo, NixRun& build, absl::string_view text);
  void Line(Run& run, absl::string_view text);
  // The valid store paths among `paths`, asked of Nix in one call.
  absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>& paths) const;
  // HarvestFods with ValidPaths; says on the build's log when it could not
  // tell which outputs are valid.
  std::vector<kiln::v1::FodOutcome> Harvest(Run& run, const ClosureIndex& index, const NixLogParser& parser,
                                            absl::string_view source, kiln::v1::BuildResult& result);
  // Reports what Nix found out about FODs to the cache.
  void Record(Run& run, const std::vector<kiln::v1::FodOutcome>& outcomes);

  const NixOptions options_;
  ProcessSupervisor supervisor_;
  absl::Mutex mu_;
  BuildId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int granted_slots_ ABSL_GUARDED_BY(mu_) = 0;  // Sum of the running builds' grants.
  absl::flat_hash_map<BuildId, std::shared_ptr<Run>> runs_ ABSL_GUARDED_BY(mu_);
  // Each build's thread, until joined; the builds whose thread has done
  // its work and is about to return.
  absl::flat_hash_map<BuildId, std::thread> threads_ ABSL_GUARDED_BY(mu_);
  std::vector<BuildId> ended_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
