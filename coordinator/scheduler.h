// Scheduler: the pure core that decides which queued job runs on which worker.
//
// It knows workers (capabilities, slots) and jobs (requirements, queue order)
// by name, and nothing of gRPC, RocksDB or time: events go in (job queued,
// worker joined, job released), decisions come out (Assign()). That makes
// every rule testable step by step without sockets.
//
// Policy today: first come, first served over one queue; a job goes to the
// least-loaded worker that matches it (ties by name, so decisions are
// deterministic). Matching follows Nix's rule: the worker builds the job's
// system, supports every required feature, and every mandatory feature of the
// worker is among the required ones.
//
// Not thread-safe: one owner (the coordinator's strand) calls it.
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace kiln {

struct WorkerCapabilities {
  std::set<std::string> systems;
  std::set<std::string> supported_features;
  std::set<std::string> mandatory_features;
  std::map<std::string, std::string> labels;
  int max_jobs = 1;
};

struct JobRequirements {
  std::string system;
  std::set<std::string> required_features;
  std::map<std::string, std::string> pinned_labels;
};

struct Assignment {
  std::string job;
  std::string worker;
};

// True when a worker with `caps` may build a job that needs `req`.
bool WorkerMatches(const WorkerCapabilities& caps, const JobRequirements& req);

class Scheduler {
 public:
  // Adds or replaces a worker. Replacing keeps the jobs it runs.
  void AddWorker(const std::string& worker, WorkerCapabilities caps);

  // Removes a worker; returns the jobs it was running (the caller requeues or
  // fails them), in assignment order.
  std::vector<std::string> RemoveWorker(const std::string& worker);

  // Queues a job, at the back (or the front, for a job that was running and
  // lost its worker, so it keeps its place). Re-queueing a queued job is a
  // no-op.
  void Enqueue(const std::string& job, JobRequirements req, bool front = false);

  // Removes a queued job. False if it was not queued.
  bool Dequeue(const std::string& job);

  // Frees the slot `job` holds on `worker`. False (and nothing changes) when
  // the job does not run there, e.g. a stale report.
  bool Release(const std::string& job, const std::string& worker);

  // Assigns as many queued jobs as free matching slots allow, in queue order.
  std::vector<Assignment> Assign();

  // Why `job` is still queued, for people ("no worker offers system …",
  // "all 2 capable workers are busy"). Empty for jobs that are not queued.
  std::string WaitingReason(const std::string& job) const;

  // Worker running `job`, or empty.
  std::string WorkerOf(const std::string& job) const;

  size_t queued() const { return queue_.size(); }
  size_t running() const { return running_.size(); }
  size_t workers() const { return workers_.size(); }
  size_t total_slots() const;
  size_t used_slots() const { return running_.size(); }

 private:
  struct WorkerState {
    WorkerCapabilities caps;
    std::vector<std::string> jobs;  // Running here, in assignment order.
  };
  struct QueuedJob {
    std::string job;
    JobRequirements req;
  };

  std::map<std::string, WorkerState> workers_;  // Ordered: deterministic ties.
  std::list<QueuedJob> queue_;
  absl::flat_hash_map<std::string, std::list<QueuedJob>::iterator> queued_index_;
  absl::flat_hash_map<std::string, std::string> running_;  // job -> worker
};

}  // namespace kiln
