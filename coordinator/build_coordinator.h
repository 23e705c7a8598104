// BuildCoordinator: the coordinator's orchestrator.
//
// It owns no job, worker or event state itself. It asks the owners for
// decisions and applies them:
// - WorkGraph: the jobs and the units of work they share (dedup, the result
//   cache's keys, retries);
// - WorkerRegistry: the workers' streams, registration, leases, drains,
//   admission limits and outboxes;
// - JobJournal: events, watchers, logs and their retention;
// - Scheduler: which queued item runs on which worker;
// - SubmissionValidator and SourceReader: checks and source trees.
// Every state change is group-committed through the StateStore before the
// events and worker messages announcing it go out. It talks to streams only
// through two small interfaces (WorkerSession, JobWatcher) whose methods
// never block, so gRPC reactors drive it in production and plain objects in
// tests.
//
// Threading: not thread-safe. Every method runs on one thread — in the
// daemon, the coordinator's SerialExecutor (strand); gRPC reactions post to
// it and return.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/source_tree.h"
#include "coordinator/blob_store.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/job_journal.h"
#include "coordinator/scheduler.h"
#include "coordinator/source_reader.h"
#include "coordinator/state_store.h"
#include "coordinator/submission_validator.h"
#include "coordinator/work_graph.h"
#include "coordinator/worker_registry.h"
#include "kiln/state/v1/records.pb.h"
#include "kiln/v1/builds.pb.h"
#include "kiln/v1/farm.pb.h"
#include "kiln/v1/workers.pb.h"

namespace kiln {

struct BuildCoordinatorOptions {
  uint32_t max_attempts = 3;           // Before a requeued job fails.
  size_t max_source_bytes = 64 << 20;  // All blobs sent inline with one submission.
  // A source tree uploaded to the CAS beforehand (any size up to this).
  uint64_t max_tree_bytes = uint64_t{4} << 30;
  // Trees up to this size travel inline with each assignment; a larger one
  // sends its directories only and the worker fetches the files it lacks.
  uint64_t inline_source_bytes = 1 << 20;
  size_t max_targets = 1000;  // Per submission.
  // Jobs one client token may have queued or running at once (0: no limit).
  uint64_t max_active_jobs_per_token = 0;
  uint32_t max_worker_jobs = 1024;       // Sanity bound on a worker's slots.
  size_t log_bytes_per_job = 8 << 20;    // Kept in memory for late watchers.
  size_t finished_jobs_with_logs = 256;  // Older finished jobs keep no log in memory.
  // Compressed logs of finished jobs kept in the store, oldest removed first.
  uint64_t log_retention_bytes = uint64_t{1} << 30;
  absl::Duration heartbeat_interval = absl::Seconds(10);
  // After a start, how long workers have to reconnect before a job that no
  // known worker could take is refused at submission.
  absl::Duration capability_grace = absl::Seconds(60);
  // How long a worker's jobs are held after its stream breaks or it falls
  // silent (no message for this long), before they are requeued.
  absl::Duration lease = absl::Seconds(60);
  // Admission: a worker past one of these (from its heartbeats) takes no
  // new job until it is back under. 0 disables a limit.
  int64_t min_store_free_bytes = int64_t{1} << 30;
  int64_t min_work_dir_free_bytes = int64_t{512} << 20;  // Its source cache and checkouts.
  // Writes stop while the state directory has less than this free, before
  // the disk is full: RocksDB cannot resume in the running process after a
  // write of its own log failed for lack of space. 0: no reserve.
  uint64_t min_free_bytes = uint64_t{8} << 20;
  // After writes stopped for lack of space, they resume once the state
  // directory has this much free (and the store resumes).
  uint64_t resume_min_free_bytes = uint64_t{16} << 20;
  double max_memory_used_fraction = 0.95;
  double max_load_per_slot = 0;  // Load average divided by the worker's slots.
  // A job requeued after an infrastructure error waits this long, doubled
  // for each further attempt (capped at 5 minutes), before it runs again.
  absl::Duration retry_backoff = absl::Seconds(5);
  // Names of the priority classes, most urgent first (wire values 1, 2, 3).
  std::vector<std::string> priority_names = {"interactive", "ci", "batch"};
  // Push targets a job may name: glob patterns over "registry/repository"
  // (e.g. "rg.fr-par.scw.cloud/sanmarcsoft/*"), or over
  // "registry/repository:tag" when the pattern names a tag. Empty: no pushes.
  std::vector<std::string> push_allow;
  // Timeout of a job that sets none; 0: none.
  absl::Duration default_timeout = absl::ZeroDuration();
  // CAS garbage collection: past `cas_max_bytes`, blobs no queued or running
  // job needs and older than `cas_gc_grace` go, oldest first, down to 90%.
  // Checked on Tick, at most every `cas_gc_interval`. 0: never.
  uint64_t cas_max_bytes = uint64_t{100} << 30;
  absl::Duration cas_gc_grace = absl::Hours(1);
  absl::Duration cas_gc_interval = absl::Minutes(10);
};

class BuildCoordinator {
 public:
  // `cas` (may be null: no uploaded trees) holds trees uploaded before a
  // submission; it must outlive the coordinator.
  BuildCoordinator(StateStore* store, CoordinatorMetrics* metrics, const Clock* clock, BuildCoordinatorOptions options,
                   BlobStore* cas = nullptr);

  // Loads the stored jobs: finished ones keep their result, queued ones are
  // queued again, ones that were assigned or running are held for their
  // worker for one lease (it re-attaches them when it reconnects), then
  // requeued. Call once, before anything else.
  absl::Status Recover();

  // Validates and durably stores a buildset. All targets or none. `token`:
  // the name of the client token that sends it ("" without one), whose quota
  // the jobs count against and which the submitter line names.
  absl::StatusOr<kiln::v1::SubmitBuildResponse> Submit(const kiln::v1::SubmitBuildRequest& request,
                                                       const std::string& token = "");

  // Replays the job's events from `from_sequence` (from the start when
  // `incarnation` is not this coordinator's), then streams new ones.
  absl::Status Watch(const std::string& job_id, uint64_t from_sequence, uint64_t incarnation,
                     std::shared_ptr<JobWatcher> watcher);
  void Unwatch(const std::string& job_id, const JobWatcher* watcher);

  absl::StatusOr<kiln::v1::JobState> Cancel(const std::string& job_id);
  absl::StatusOr<kiln::v1::Job> GetJob(const std::string& job_id) const;
  absl::StatusOr<kiln::v1::Buildset> GetBuildset(const std::string& buildset_id) const;
  // The job's state and, for a job not finished, its log so far; for a
  // finished one, its in-memory log unless `have_stored` (the caller read
  // the stored one), and whether the retention limit removed it.
  absl::Status GetJobLog(const std::string& job_id, bool have_stored, kiln::v1::GetJobLogResponse* out) const;
  // The `limit` most recent buildsets, newest first.
  kiln::v1::ListBuildsetsResponse ListBuildsets(size_t limit) const;
  // The output paths of the succeeded jobs of the `buildsets` most recent
  // buildsets (what the farm store's collection keeps).
  std::vector<std::string> RecentOutputs(size_t buildsets) const;
  absl::StatusOr<kiln::v1::Buildset> CancelBuildset(const std::string& buildset_id);

  // Operators' view of the workers, and drain (kept across a worker's
  // reconnects, not across a coordinator restart).
  kiln::v1::ListWorkersResponse ListWorkers() const;
  absl::StatusOr<kiln::v1::WorkerInfo> DrainWorker(const std::string& name, bool undo);

  // A message from a worker's stream; the first one must be Register.
  void OnWorkerMessage(const std::shared_ptr<WorkerSession>& session, const kiln::v1::WorkerMessage& message);
  // Log lines from a worker's SendLogs call; lines of attempts that are not
  // `worker`'s current ones are ignored.
  void OnWorkerLogs(const std::string& worker, const kiln::v1::LogBatch& batch);
  // The stream ended. Idempotent. The worker's jobs are held for its lease.
  void OnWorkerGone(const WorkerSession* session);

  // Group commit. Unbatched (the default, for tests), every call above
  // ends with Flush(). Batched (the daemon), state changes, events and
  // messages to workers gather until the strand's batch of calls ends and
  // it calls Flush(): one RocksDB write and one message per worker for all
  // of them, and one scheduling round for every slot the batch freed.
  void set_batched(bool batched) { batched_ = batched; }
  // Places what can be placed, stores every pending state change in one
  // atomic write, then releases the events and worker messages that wait
  // for it. Cheap when nothing is pending.
  void Flush();

  // Periodic: closes the streams of workers silent past the lease and
  // requeues the jobs of workers whose lease ran out.
  void Tick();

  // False from a failed state write (a full disk) until the store takes
  // writes again. Meanwhile nothing is announced that is not stored: events,
  // acknowledgements and assignments wait, submissions are refused with
  // kCoordinatorOutOfSpace, and each Flush (Tick runs one every second) asks
  // the store to resume, at most once a second. Thread-safe (for /readyz).
  bool state_writable() const { return state_writable_.load(); }

  // Runs the CAS's garbage collection now (Tick does when over the limit);
  // the bytes freed.
  absl::StatusOr<uint64_t> CollectGarbage();

  // Closes every watcher and worker stream (shutdown).
  void CloseAll();

  const Scheduler& scheduler() const { return scheduler_; }

 private:
  // The log lines' component (one name for the class's three .cc files).
  static constexpr absl::string_view kComponent = "coordinator";
  using Job = WorkGraph::Job;
  using WorkerEntry = WorkerRegistry::Worker;

  // OnWorkerGone and Tick without the flush, for use inside other calls.
  void WorkerGone(const WorkerSession* session);
  void CheckLeases();
  void HandleRegister(WorkerEntry& worker, const kiln::v1::Register& reg);
  // Keeps the held jobs the returning worker still has, requeues the others
  // and cancels what it has that is no longer its to run.
  void Reconcile(WorkerEntry& worker, const kiln::v1::Register& reg);
  void ExpireLease(const std::string& worker, const std::string& why);
  // Applies the admission limits to a worker's heartbeat.
  void HandleHeartbeat(WorkerEntry& worker, const kiln::v1::Heartbeat& heartbeat);
  void HandleFinished(WorkerEntry& worker, const kiln::v1::JobFinished& finished);
  // Flushes unless batched (the end of every public entry point).
  void EndOfCall() {
    if (!batched_) Flush();
  }
  // Stores the trees sent inline with a submission in the CAS.
  absl::Status StoreInlineTrees(const CheckedSubmission& checked);
  // The record of target `i` of a submission, finished already when the
  // result cache has it.
  std::unique_ptr<kiln::state::v1::JobRecord> NewRecord(const kiln::v1::SubmitBuildRequest& request, int i,
                                                        const std::string& token, const BlobLookup& lookup,
                                                        absl::Time now);

  // Queues a job that is not running: it shares an identical job's item in
  // flight, or it runs its own and goes into the scheduler.
  void Admit(const std::string& id, Job& job, const kiln::state::v1::JobRecord& record);
  // Whether every output of `result` is a tree stored in the CAS.
  bool OutputsInCas(const kiln::v1::BuildResult& result) const;

  void Dispatch();
  // Back to the front of the queue; `backoff` (infrastructure errors)
  // delays its next placement by retry_backoff * 2^(attempt-1).
  void Requeue(Job& job, absl::string_view reason_label, const std::string& reason, bool backoff = false);
  // Ends a job and the jobs sharing its item (or, if it was cancelled,
  // admits them again: one of them runs the item now).
  void Finish(Job& job, kiln::v1::JobState state, kiln::v1::BuildResult result);
  void FinishOne(Job& job, kiln::v1::JobState state, kiln::v1::BuildResult result);
  // Records an event of job `id` in the journal.
  void Emit(const std::string& id, Job& job, kiln::v1::JobEvent event);
  // Hands a finished job's log to the journal for the store, and marks the
  // records of older logs the retention limit removes.
  void StoreLog(Job& job);
  // After the capability grace window: fails the queued jobs that no known
  // worker could ever build (as Submit refuses them from then on).
  void FailWhatNoKnownWorkerCanBuild();
  // Whether the store takes writes: true if it did, or resumes now (tried at
  // most once a second).
  bool EnsureWritable();
  // Nothing more is announced until writes resume: after a failed write, or
  // (`write_failed` false) at the free-space reserve.
  void StopWrites(const absl::Status& why, bool write_failed = true);
  // The refusal for new work while the store takes no writes.
  absl::Status OutOfSpace() const;
  // Refreshes the gauges, at most every 100 ms unless forced (Tick flushes).
  void UpdateGauges(bool force = false);

  StateStore* const store_;
  BlobStore* const cas_;
  CoordinatorMetrics* const metrics_;
  const Clock* const clock_;
  const BuildCoordinatorOptions options_;
  const absl::Time started_;
  bool batched_ = false;
  absl::Time last_gc_ = absl::InfinitePast();
  bool flushing_ = false;
  std::atomic<bool> state_writable_{true};
  bool grace_checked_ = false;  // FailWhatNoKnownWorkerCanBuild has run.
  std::string state_error_;     // Why the last write failed.
  absl::Time next_resume_ = absl::InfinitePast();
  absl::Time gauges_updated_ = absl::InfinitePast();
  bool gauges_dirty_ = false;
  // (priority class, system label) of every kiln_jobs_queued series set.
  absl::flat_hash_set<std::pair<int, std::string>> queued_series_;

  // The owners the coordinator asks for decisions.
  WorkGraph graph_;
  Scheduler scheduler_;
  JobJournal journal_;
  WorkerRegistry registry_;
  const SubmissionValidator validator_;
  SourceReader sources_;
};

}  // namespace kiln
