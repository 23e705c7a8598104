// FodCheckingExecutor: a BuildExecutor decorator that checks a job's
// fixed-output derivations against the fleet's FOD hash cache before its
// build, and tells the cache what the build found. Below it, Nix runs
// (NixBuildExecutor); above it, images are published (PublishingExecutor).
//
// A job goes in steps, each one a request to the inner executor:
//   1. evaluate path:DIR#ATTR once, to its .drv (BuildRequest::kEvaluate);
//      the job's build starts with it, waiting for its derivation to be
//      handed over, so the two do not pay Nix's start-up one after the other
//   2. read the closure's .drv files; look up every FOD in one call
//   3. a FOD the cache knows to be declared wrong (fake or stale hash) fails
//      the job at once, naming the right hash; the hand-over is withdrawn
//      and nothing is built
//   4. a FOD suspected stale (its hash was computed for older inputs) whose
//      output this worker holds is rebuilt (`--rebuild`) to verify, on the
//      job's derivation slots
//   5. the evaluated .drv is handed over to the waiting build
//   6. every FOD built, and every hash mismatch Nix reported, is recorded
// FOD tasks (`kiln fod-hash`) stop after step 2 (MODE_SCAN: the verdicts) or
// build the FODs asked for and report their hashes (MODE_COMPUTE).
// Kiln's own trouble (an unreadable .drv, the cache unreachable) never stops
// a build: it runs without checks, and its log says why.
//
// Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "worker/build_executor.h"
#include "worker/build_threads.h"
#include "worker/fod_oracle.h"
#include "worker/fod_outcomes.h"
#include "worker/local_store.h"

namespace kiln {

class FodCheckingExecutor final : public BuildExecutor {
 public:
  // All three must outlive this.
  FodCheckingExecutor(BuildExecutor* inner, FodOracle* oracle, LocalStore* store)
      : inner_(inner), oracle_(oracle), store_(store) {}
  // Cancels what still runs and waits for every job's steps to end.
  ~FodCheckingExecutor() override;

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override
      ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(BuildId id) override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Job;
  struct Step;

  void Execute(const std::shared_ptr<Job>& job) ABSL_LOCKS_EXCLUDED(mu_);
  // Starts a step on the inner executor; its result arrives in `step`
  // (at once, when the job is cancelled or the step cannot start).
  void StartStep(Job& job, BuildRequest request, Step& step) ABSL_LOCKS_EXCLUDED(mu_);
  // StartStep, then waits for the result.
  kiln::v1::BuildResult RunStep(Job& job, BuildRequest request, NixRunReport* report = nullptr)
      ABSL_LOCKS_EXCLUDED(mu_);
  bool Cancelled(Job& job) ABSL_LOCKS_EXCLUDED(mu_);
  // Steps 1–6 above; `build` is the job's build, started and waiting for
  // its derivation (null for FOD tasks).
  void CheckAndBuild(Job& job, Step* build, kiln::v1::BuildResult& result);
  // FodTask::MODE_COMPUTE: builds the FODs asked for and reports their hashes.
  void ComputeFods(Job& job, const std::vector<ClosureFod>& fods, const ClosureIndex& index,
                   kiln::v1::BuildResult& result);
  std::vector<kiln::v1::FodOutcome> Harvest(Job& job, const ClosureIndex& index, const NixRunReport& nix,
                                            absl::string_view source, kiln::v1::BuildResult& result);
  // Reports what Nix found out about FODs to the cache.
  void Record(Job& job, const std::vector<kiln::v1::FodOutcome>& outcomes);
  void Line(Job& job, absl::string_view text);

  BuildExecutor* const inner_;
  FodOracle* const oracle_;
  LocalStore* const store_;
  absl::Mutex mu_;
  BuildId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<BuildId, std::shared_ptr<Job>> jobs_ ABSL_GUARDED_BY(mu_);
  // Last: destroyed first, so no job's thread outlives what it uses.
  BuildThreads threads_;
};

}  // namespace kiln
