// StepGraph: builds as derivation graphs — steps shared farm-wide, released
// as their inputs are built, taken critical path first. The pure core of
// derivation-level scheduling (docs/ARCHITECTURE.md, "Steps"); the
// coordinator's integration (evaluation returning the closure, steps as
// derivation jobs on workers, placement by locality) builds on it.
//
// A step is one derivation, keyed by its .drv path. A job (one target's
// build) needs the steps of its closure; a step several jobs need is one
// step, built once. A step is waiting until every input step is done, then
// runnable, then running, then done, failed or dropped. Runnable steps
// leave in a fixed order:
//   1. the priority class of the most urgent job that needs the step;
//   2. its upward rank, the critical path weighted by time: its expected
//      duration plus the largest rank among the unfinished steps that need
//      it (so the longest remaining chain goes first);
//   3. arrival.
// Expected durations come from a DurationModel: a moving average of the
// recorded durations of earlier builds of the same derivation name, else a
// default.
//
// A failed step fails every job that needs it, with its message; steps
// that no remaining job needs are dropped (running ones returned, for the
// owner to stop); independent steps go on (keep-going). A cancelled job
// drops the steps no other job needs the same way. An infrastructure
// failure puts a running step back (the owner counts attempts).
//
// Deterministic, with no clock and no I/O: one owner calls it and acts on
// the StepEffects each call returns. Not thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kiln {

// Expected build durations by derivation name ("hello-2.12").
class DurationModel {
 public:
  explicit DurationModel(absl::Duration default_duration = absl::Seconds(30)) : default_(default_duration) {}
  absl::Duration Expected(const std::string& name) const;
  // A build of `name` took `took`: the average moves a third of the way.
  void Record(const std::string& name, absl::Duration took);

 private:
  const absl::Duration default_;
  absl::flat_hash_map<std::string, absl::Duration> average_;
};

// One derivation of a job's closure.
struct StepSpec {
  std::string drv_path;
  std::string name;                 // The derivation's name, for its expected duration.
  std::vector<std::string> inputs;  // The .drv paths of its input derivations.
};

enum class StepState { kWaiting, kRunnable, kRunning, kDone, kFailed, kDropped };
const char* StepStateName(StepState state);

struct JobOutcome {
  bool succeeded = false;
  bool cancelled = false;
  std::string failed_step;  // The step whose failure failed the job.
  std::string message;
};

// What a call changed, for the owner to act on.
struct StepEffects {
  std::vector<std::string> runnable;  // Steps that became runnable.
  std::vector<std::string> stop;      // Running steps no job needs any more.
  std::vector<std::pair<std::string, JobOutcome>> jobs_finished;
};

class StepGraph {
 public:
  explicit StepGraph(const DurationModel* durations) : durations_(durations) {}
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  // Job `job` (`priority_class` 0 the most urgent) wants `tops`; `closure`
  // holds every step they need (each input of a step in it is in it).
  // Steps already in the graph are shared (their specs here are ignored);
  // those in `built` (their outputs are in the farm store) are done at
  // once. A job whose tops are all done finishes at once. Errors: a known
  // job, a top or an input outside the closure, a cycle — nothing changes.
  absl::StatusOr<StepEffects> AddJob(const std::string& job, int priority_class, const std::vector<std::string>& tops,
                                     const std::vector<StepSpec>& closure,
                                     const absl::flat_hash_set<std::string>& built);

  // The runnable steps in the order they should go, at most `limit`.
  std::vector<std::string> Runnable(size_t limit) const;
  // A runnable step goes to a worker.
  absl::Status Started(const std::string& drv);
  // A running step built: its dependents may become runnable, and jobs
  // whose tops are now all done finish.
  absl::StatusOr<StepEffects> Succeeded(const std::string& drv);
  // A running step failed for good (Nix's `message`).
  absl::StatusOr<StepEffects> Failed(const std::string& drv, const std::string& message);
  // A running step's worker was lost: runnable again.
  absl::Status Requeue(const std::string& drv);
  StepEffects CancelJob(const std::string& job);

  std::optional<StepState> state(const std::string& drv) const;
  // Steps per state, of every job (`job` empty) or of one job.
  std::map<StepState, size_t> Counts(const std::string& job = "") const;
  // The job's remaining critical path: the largest rank among its
  // unfinished steps (zero when none).
  absl::Duration RemainingCriticalPath(const std::string& job) const;
  size_t size() const { return steps_.size(); }

 private:
  struct Step;
  struct Job {
    int priority_class = 1;
    std::vector<Step*> steps;  // Its closure.
    size_t tops_left = 0;
  };
  struct Step {
    std::string drv;
    std::string name;
    StepState state = StepState::kWaiting;
    std::vector<Step*> inputs, dependents;
    size_t inputs_left = 0;                   // Input steps not yet done.
    absl::flat_hash_set<std::string> jobs;    // Jobs that need it.
    absl::flat_hash_set<std::string> top_of;  // Jobs for which it is a top.
    int priority_class = 1 << 20;             // Of its most urgent job.
    int64_t rank_ns = 0;                      // Upward rank.
    uint64_t seq = 0;                         // Arrival.
  };
  // Runnable order: class, then larger rank, then arrival.
  using Key = std::tuple<int, int64_t, uint64_t>;
  static Key KeyOf(const Step& s) { return {s.priority_class, -s.rank_ns, s.seq}; }

  // The step `drv`, when it is in `state`; FAILED_PRECONDITION otherwise.
  absl::StatusOr<Step*> StepIn(const std::string& drv, StepState state);
  void MakeRunnable(Step& s, StepEffects& effects);
  void SetOrder(Step& s, int priority_class, int64_t rank_ns);
  // Job `job` leaves every step of its closure; steps no job needs any
  // more are dropped.
  void Leave(const std::string& job, StepEffects& effects);

  const DurationModel* const durations_;
  absl::flat_hash_map<std::string, std::unique_ptr<Step>> steps_;
  absl::flat_hash_map<std::string, Job> jobs_;
  std::map<Key, Step*> runnable_;
  uint64_t next_seq_ = 0;
};

}  // namespace kiln
