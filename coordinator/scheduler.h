// Scheduler: the pure core that decides which queued job runs on which worker.
//
// It knows workers (capabilities, slots) and jobs (requirements, queue order)
// by name, and nothing of gRPC, RocksDB or time: events go in (job queued,
// worker joined, job released), decisions come out (Assign()). That makes
// every rule testable step by step without sockets.
//
// Policy (docs/ARCHITECTURE.md, "Scheduling"):
// - Matching follows Nix's rule: the worker builds the job's system, supports
//   every required feature, every mandatory feature of the worker is among the
//   required ones, and every label the job pins has that value on the worker.
// - Priority classes are strict: a queued job of a more urgent class is
//   placed before any job of a less urgent one.
// - Within a class, buildsets share slots round-robin (deficit round-robin
//   with a quantum of one job): each active buildset places one job per turn,
//   so a 500-target buildset delays a newly arrived single job by at most one
//   placement per other active buildset. Within a buildset, jobs go in order;
//   a job no free worker can take does not hold back later jobs that others
//   can.
// - Placement: the matching workers form a consistent-hash ring (points per
//   worker in proportion to its speed factor). A job's preferred worker is
//   the first usable one at or after its locality key's point, so rebuilds
//   of a flake land where its store is warm and only ~1/N of keys move when
//   a worker joins or leaves; lookups cost O(log ring), not O(workers). When
//   the preferred worker is full, the job goes to the least-loaded of the
//   next few workers on the ring with a free slot (power of k choices), and
//   only if all of those are full to the least-loaded of all.
// Not thread-safe: one owner (the coordinator's strand) calls it.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kiln {

struct WorkerCapabilities {
  std::set<std::string> systems;
  std::set<std::string> supported_features;
  std::set<std::string> mandatory_features;
  std::map<std::string, std::string> labels;
  int max_jobs = 1;
  double speed_factor = 1.0;  // Relative speed; weights locality.
};

struct JobRequirements {
  std::string system;
  std::set<std::string> required_features;
  std::map<std::string, std::string> pinned_labels;
};

// Where a job sits in the queue and where it would rather run.
struct JobPlacement {
  int priority_class = 1;    // 0 is the most urgent; see kPriorityClasses.
  std::string buildset;      // Fair sharing is between buildsets.
  std::string locality_key;  // Same key, same preferred worker.
  // Not placed before this time (a retry's back-off); InfinitePast: at once.
  absl::Time not_before = absl::InfinitePast();
};

inline constexpr int kPriorityClasses = 3;

struct Assignment {
  std::string job;
  std::string worker;
};

// True when a worker with `caps` may build a job that needs `req`.
bool WorkerMatches(const WorkerCapabilities& caps, const JobRequirements& req);

// A weighted consistent-hash ring over members 0..n-1.
class HashRing {
 public:
  static constexpr int kPointsPerWeight = 64;
  // `weights[i]` > 0 gives member i that many times kPointsPerWeight points.
  explicit HashRing(const std::vector<std::pair<std::string, double>>& members = {});
  // Calls `visit(member)` for distinct members in ring order from `key`'s
  // point, until it returns true or every member was visited.
  template <typename Visit>
  void Walk(absl::string_view key, Visit visit) const {
    WalkFrom(KeyPoint(key), std::move(visit));
  }
  template <typename Visit>
  void WalkFrom(uint64_t point, Visit visit) const {
    if (points_.empty()) return;
    std::vector<uint32_t> seen;
    auto it = std::lower_bound(points_.begin(), points_.end(), std::make_pair(point, uint32_t{0}));
    for (size_t n = 0; n < points_.size() && seen.size() < members_; ++n, ++it) {
      if (it == points_.end()) it = points_.begin();
      const uint32_t m = it->second;
      if (std::find(seen.begin(), seen.end(), m) != seen.end()) continue;
      seen.push_back(m);
      if (visit(m)) return;
    }
  }
  // The first member from `key`'s point.
  uint32_t Owner(absl::string_view key) const;
  static uint64_t KeyPoint(absl::string_view key);

 private:
  std::vector<std::pair<uint64_t, uint32_t>> points_;
  size_t members_ = 0;
};

class Scheduler {
 public:
  // Adds or replaces a worker, online. Replacing keeps the jobs it runs.
  void AddWorker(const std::string& worker, WorkerCapabilities caps);

  // Marks a worker offline (its stream broke; it holds its jobs under a
  // lease, takes nothing new) or online again. False for an unknown worker.
  bool SetOnline(const std::string& worker, bool online);

  // Records that `job` runs on `worker` (after a coordinator restart, before
  // the worker is back): an unknown worker is added offline, with no slots.
  void Reattach(const std::string& job, const std::string& worker);

  // The capabilities of a worker (default ones for an unknown name), and
  // the limit it is over ("" when none).
  WorkerCapabilities CapabilitiesOf(const std::string& worker) const;
  std::string OverLimitOf(const std::string& worker) const;

  // Jobs running on `worker`, in assignment order.
  std::vector<std::string> JobsOf(const std::string& worker) const;

  // What the scheduler knows of each worker, by name (for operators).
  struct WorkerView {
    std::string name;
    WorkerCapabilities caps;
    std::vector<std::string> jobs;
    bool draining = false;
    bool online = false;
    std::string over_limit;
  };
  std::vector<WorkerView> Workers() const;

  // Removes a worker; returns the jobs it was running (the caller requeues or
  // fails them), in assignment order.
  std::vector<std::string> RemoveWorker(const std::string& worker);

  // Stops (or resumes) new assignments to a worker; its running jobs go on.
  // False for an unknown worker.
  bool SetDraining(const std::string& worker, bool draining);

  // Marks a worker over one of its limits (`reason`, e.g. "0.4 GiB free on
  // its Nix store, below 1 GiB"), so it takes nothing new; "" lifts it.
  bool SetOverLimit(const std::string& worker, std::string reason);

  // Queues a job at the back of its buildset (or the front, for a job that
  // was running and lost its worker, so it keeps its place). Re-queueing a
  // queued job is a no-op.
  void Enqueue(const std::string& job, JobRequirements req, JobPlacement placement = {}, bool front = false);

  // Makes room for `jobs` queued jobs (before a recovery).
  void Reserve(size_t jobs) { queued_.reserve(jobs); }

  // Removes a queued job. False if it was not queued.
  bool Dequeue(const std::string& job);

  // Frees the slot `job` holds on `worker`. False (and nothing changes) when
  // the job does not run there, e.g. a stale report.
  bool Release(const std::string& job, const std::string& worker);

  // Assigns as many queued jobs as free matching slots allow, in queue order.
  // `now` only matters to jobs with a back-off (JobPlacement::not_before).
  std::vector<Assignment> Assign(absl::Time now = absl::InfiniteFuture());

  // Why `job` is still queued, for people ("no worker offers system …",
  // "all 2 capable workers are busy"). Empty for jobs that are not queued.
  std::string WaitingReason(const std::string& job, absl::Time now = absl::InfinitePast()) const;

  // Why no worker that ever registered (connected or not) could take a job
  // that needs `req`; empty when one could.
  std::string UnmetByKnownWorkers(const JobRequirements& req) const;

  // Worker running `job`, or empty.
  std::string WorkerOf(const std::string& job) const;

  bool has_known_workers() const { return !known_.empty(); }
  // Every system some worker that ever registered builds.
  std::set<std::string> KnownSystems() const;
  size_t queued() const { return queued_.size(); }
  // Calls `fn(job id)` for every queued and every running job.
  template <typename Fn>
  void ForEachLiveJob(Fn fn) const {
    for (const auto& entry : queued_) fn(entry.first);
    for (const auto& entry : running_) fn(entry.first);
  }
  size_t running() const { return running_.size(); }
  size_t workers() const { return workers_.size(); }
  // Free slots as kept incrementally, and counted afresh (they must agree).
  int64_t free_slots() const { return free_slots_; }
  int64_t CountFreeSlots() const;
  size_t total_slots() const;
  // Slots in use on online workers.
  size_t used_slots() const;
  // Queued jobs by (priority class, system); only non-zero counts.
  const std::map<std::pair<int, std::string>, int64_t>& queued_by_class_system() const {
    return queued_by_class_system_;
  }

 private:
  struct WorkerState {
    WorkerCapabilities caps;
    std::vector<std::string> jobs;  // Running here, in assignment order.
    bool draining = false;
    bool online = false;     // AddWorker brings it online; a fresh state has no free slot.
    std::string over_limit;  // Why it takes nothing new (load, memory, disk); empty: fine.
    int free() const {
      return draining || !online || !over_limit.empty() ? 0
                                                        : std::max(0, caps.max_jobs - static_cast<int>(jobs.size()));
    }
  };
  // A requirement set shared by the queued jobs that have it (many jobs,
  // few distinct sets): a queued job holds a pointer, not a copy.
  struct RequirementSet {
    JobRequirements req;
    std::string key;  // Jobs with equal keys match the same workers.
    size_t jobs = 0;
  };
  // Kept small: a farm may hold a million of these.
  struct QueuedJob {
    RequirementSet* reqs = nullptr;
    std::string buildset;
    uint64_t locality_point = 0;  // HashRing::KeyPoint of the locality key.
    uint64_t seq = 0;             // Tells a live queue entry from a stale one.
    int64_t not_before_ns = 0;    // Back-off end, Unix ns; 0: none.
    int8_t priority_class = 1;
    bool has_locality = false;
  };
  struct Entry {
    std::string job;
    uint64_t seq;
  };
  struct PriorityClass {
    absl::flat_hash_map<std::string, std::deque<Entry>> by_buildset;
    std::list<std::string> rotation;  // Buildsets with queued jobs, in turn order.
  };

  // Tries to place `job`; true and the assignment appended when it found a
  // worker with a free slot.
  bool Place(const std::string& job, const QueuedJob& q, std::vector<Assignment>& out);
  using WorkerNode = std::pair<const std::string, WorkerState>;  // A node of workers_: stable address.
  // The workers matching a requirement key, by name, and their ring.
  struct MatchSet {
    std::vector<WorkerNode*> workers;
    HashRing ring;
  };
  // Cached per requirement key until the set of workers changes.
  const MatchSet& Matching(const QueuedJob& q);
  // Removes a job from queued_ (its queue entry goes stale); false if absent.
  bool EraseQueued(const std::string& job);
  // Applies `change` to a worker, keeping free_slots_ right.
  template <typename Change>
  void Update(WorkerState& w, Change change) {
    free_slots_ -= w.free();
    change();
    free_slots_ += w.free();
  }

  std::map<std::string, WorkerState> workers_;       // Ordered: deterministic ties.
  std::map<std::string, WorkerCapabilities> known_;  // Every worker ever registered.
  std::array<PriorityClass, kPriorityClasses> classes_;
  absl::flat_hash_map<std::string, QueuedJob> queued_;
  absl::flat_hash_map<std::string, std::string> running_;  // job -> worker
  absl::flat_hash_map<std::string, MatchSet> matching_cache_;
  absl::node_hash_map<std::string, RequirementSet> requirement_sets_;  // Stable addresses.
  std::map<std::pair<int, std::string>, int64_t> queued_by_class_system_;
  uint64_t next_seq_ = 1;
  int64_t free_slots_ = 0;  // Sum of free() over workers_: Assign needs it in O(1).
};

}  // namespace kiln
