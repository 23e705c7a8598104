// WorkGraph: the coordinator's jobs and the units of work they stand for.
//
// A work item is keyed by content — today the target's source tree, flake
// directory, attribute, system, features, labels and push target (a later
// issue: the .drv path). Jobs are views onto items: a job identical to one
// in flight shares that item and ends with its result; a result-cache hit
// is a job whose item was done before (it finishes at submission); a retry
// is the item going back to the queue, with a back-off after an
// infrastructure error. One job of each item carries its attempts (its
// runner); the others wait on it.
//
// It owns every job record in memory and which of them changed since the
// last write. It decides and records; the coordinator places items on
// workers (the Scheduler), announces (the JobJournal) and writes (the
// StateStore, one group commit per batch: TakeWrites, then Committed or
// WriteFailed).
//
// A million queued jobs must fit in about a GiB: a record is kept
// serialized (~150 bytes) and parsed (~770 bytes) only while the job is
// being worked on (Rec() parses; DropParsed() after a write keeps only the
// bytes of queued and finished jobs).
//
// Not thread-safe: the coordinator's strand calls it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/time/time.h"
#include "coordinator/job_journal.h"
#include "kiln/state/v1/records.pb.h"
#include "kiln/v1/builds.pb.h"
#include "kiln/v1/farm.pb.h"

namespace kiln {

bool IsTerminal(kiln::v1::JobState state);

class WorkGraph {
 public:
  struct Job {
    std::string packed;  // The serialized record, as last stored.
    std::unique_ptr<kiln::state::v1::JobRecord> parsed;
    bool dirty = false;    // Changed since the last write.
    bool touched = false;  // Parsed since the last write.
    absl::Time queued_at;
    JobJournal::Entry journal;  // Its events, watchers and log: the JobJournal's.
  };

  // What Admit decided.
  struct Admitted {
    // Empty: the job runs its item (the caller queues it). Else the job
    // that does, whose result this one will share.
    std::string shares_with;
  };

  // What leaving an item leaves behind.
  struct Left {
    std::vector<std::string> waiting;  // Jobs that shared the item, in order.
  };

  // The key of a job's work item, and its hash (the in-flight index).
  static std::string ItemKey(const kiln::v1::JobSpec& spec);
  // The result cache's key of a target whose flake directory is `flake_subtree`.
  static std::string ResultKey(const kiln::v1::Digest& flake_subtree, const kiln::v1::JobSpec& spec);
  // A sharing job's waiting reason.
  static std::string SharingReason(const std::string& runner);

  Job* Find(const std::string& id);
  const Job* Find(const std::string& id) const;
  // The job's record, parsed on first use; changes are stored once the job
  // is Persist()ed.
  kiln::state::v1::JobRecord& Rec(Job& job);
  // Read-only: the parsed record if there is one, else parsed into `scratch`.
  static const kiln::state::v1::JobRecord& View(const Job& job, kiln::state::v1::JobRecord& scratch);
  // Marks the job's (parsed) record for the next write.
  void Persist(Job& job);

  // Recovery: sizes the tables for `jobs`, then adds each stored record.
  void Reserve(size_t jobs);
  Job& Load(absl::string_view packed, const kiln::state::v1::JobRecord& record, absl::Time now);
  void SetCounters(uint64_t next_job_seq, uint64_t next_buildset_seq);

  // Submission: the ids the next buildset and its jobs get; Add after the
  // write that stored them (Accept the counters first).
  std::string NextBuildsetId() const;
  std::string NextJobId(size_t index) const;
  uint64_t next_job_seq() const { return next_job_seq_; }
  uint64_t next_buildset_seq() const { return next_buildset_seq_; }
  void Accept(size_t jobs);
  Job& Add(std::unique_ptr<kiln::state::v1::JobRecord> record, std::string packed, absl::Time now);

  // A queued job: it shares the item of an identical job in flight, or it
  // runs a new one. Its token's quota counts it until it ends.
  Admitted Admit(const std::string& id, const kiln::state::v1::JobRecord& record);
  // A recovered job that was on a worker runs its item.
  void HoldItem(const std::string& id, const kiln::state::v1::JobRecord& record);
  // The job runs its item or shares it ("" when neither).
  std::string RunnerOf(const std::string& id, const kiln::state::v1::JobRecord& record) const;

  // The job leaves its item: a sharing job stops waiting; a runner ends the
  // item, and the jobs that waited on it are returned (the caller finishes
  // them with its result, or admits them again if it was cancelled).
  Left Leave(const std::string& id, const kiln::state::v1::JobRecord& record);

  // State changes, each persisted.
  void MarkAssigned(Job& job, const std::string& worker);
  void MarkStarted(Job& job, absl::Time now);
  // Back to the queue; nullopt when it has had `max_attempts` already (the
  // caller fails it). Else when it may run again: at once, or after
  // `backoff` * 2^(attempt-1) (at most 5 minutes) for an infrastructure error.
  std::optional<absl::Time> Requeue(Job& job, const std::string& reason, uint32_t max_attempts, absl::Duration backoff,
                                    absl::Time now);
  // Ends the job: its state, result and time; its token's quota frees.
  void End(Job& job, kiln::v1::JobState state, kiln::v1::BuildResult result, absl::Time now);
  // A successful result for the cache, stored with the next write.
  void CacheResult(const std::string& key, const kiln::state::v1::JobRecord& done);

  // The attempt a worker reports, or null when it is not that worker's
  // current attempt (fencing) or the job ended.
  Job* FindAttempt(const std::string& worker, const std::string& id, uint32_t attempt);

  // Jobs the token has queued or running.
  uint64_t ActiveOf(const std::string& token) const;
  const std::vector<std::string>* BuildsetJobs(const std::string& buildset_id) const;
  // The `limit` most recent buildsets, newest first, summarised.
  kiln::v1::ListBuildsetsResponse ListBuildsets(size_t limit) const;
  size_t size() const { return jobs_.size(); }
  template <typename Fn>
  void ForEachJob(Fn fn) {
    for (auto& [id, job] : jobs_) fn(id, job);
  }

  // Group commit: the changed records and cached results go into the
  // caller's write (pointers valid until Committed or WriteFailed).
  bool has_writes() const { return !pending_jobs_.empty(); }
  void TakeWrites(std::vector<std::pair<const std::string*, const std::string*>>& packed_jobs,
                  std::vector<std::pair<std::string, const kiln::state::v1::CachedResult*>>& cached_results);
  void Committed();
  void WriteFailed();  // Kept for the next write.
  // After a write: queued and finished jobs keep only their bytes.
  void DropParsed();

 private:
  // The jobs sharing one unit of work; the runner carries its attempts.
  struct WorkItem {
    std::string runner;
    std::vector<std::string> waiting = {};
  };
  static uint64_t ItemHash(const kiln::v1::JobSpec& spec);

  // A node map: records stay put while a pending write points at them, and
  // the journal holds entries by address.
  absl::node_hash_map<std::string, Job> jobs_;
  // Items in flight, by hash of their key (a million keys would cost ~100 MB
  // as strings); a hit is confirmed against the runner's own key.
  absl::flat_hash_map<uint64_t, WorkItem> items_;
  absl::flat_hash_map<std::string, std::vector<std::string>> buildsets_;  // Job ids, in order.
  absl::flat_hash_map<std::string, uint64_t> active_by_token_;
  std::vector<Job*> pending_jobs_;
  std::vector<Job*> touched_;
  std::vector<std::pair<std::string, kiln::state::v1::CachedResult>> pending_results_;
  uint64_t next_job_seq_ = 1;
  uint64_t next_buildset_seq_ = 1;
};

}  // namespace kiln
