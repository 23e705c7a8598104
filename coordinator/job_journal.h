// JobJournal: what the coordinator tells about jobs — each job's event
// history, who watches it, its log while it runs, and the stored logs of
// finished jobs with their retention limit.
//
// It decides; it does not write. Events reach live watchers only at
// Release(), which the coordinator calls after the state change they report
// is stored; finished logs to store and expired ones to delete wait in the
// journal until the coordinator takes them into its next write.
//
// One job's slice of the journal (its Entry) lives inside the job table's
// node rather than in a second map here: a million jobs would otherwise pay
// for another key and table slot each (docs/BENCHMARKS.md, dispatch,
// rss_bytes_per_queued_job). Only JobJournal reads or changes an Entry, and
// an Entry must stay at its address while the journal may hold it (the job
// table is a node map that never erases).
//
// Not thread-safe: the coordinator's strand calls it.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "common/clock.h"
#include "kiln/v1/builds.pb.h"

namespace kiln {

// Someone watching one job's events.
class JobWatcher {
 public:
  virtual ~JobWatcher() = default;
  // Never blocks. A slow watcher may drop log events (it says how many); it
  // never drops the others.
  virtual void OnEvent(const kiln::v1::JobEvent& event) = 0;
  // No more events: after the terminal one, or on shutdown.
  virtual void Close(absl::Status status) = 0;
};

struct JobJournalOptions {
  size_t log_bytes_per_job = 8 << 20;    // Kept in memory for late watchers.
  size_t finished_jobs_with_logs = 256;  // Older finished jobs keep no log in memory.
  // Compressed logs of finished jobs kept in the store, oldest removed first.
  uint64_t log_retention_bytes = uint64_t{1} << 30;
};

class JobJournal {
 public:
  class Entry {
   private:
    friend class JobJournal;
    // The events so far, each a length-prefixed serialized JobEvent without
    // job_id and incarnation (added on replay): ~30 bytes, not ~160.
    std::string history;
    std::vector<std::shared_ptr<JobWatcher>> watchers;
    uint32_t log_bytes = 0;
    uint32_t dropped_log_lines = 0;  // Past log_bytes_per_job: not kept.
    uint32_t next_sequence = 1;
  };

  // What finishing a job's log decided.
  struct StoredLog {
    int64_t bytes = 0;  // Its compressed size in the store; 0: nothing stored.
    // Older jobs whose stored logs the retention limit removes now (their
    // records say so: stored_log_bytes 0, log_expired).
    std::vector<std::string> expired;
  };

  // `incarnation` tells this process's event sequences from an earlier one's.
  JobJournal(const Clock* clock, uint64_t incarnation, JobJournalOptions options);

  uint64_t incarnation() const { return incarnation_; }

  // Records an event, numbered and stamped here. Live watchers hear of it at
  // the next Release(). A log event past the job's memory budget reaches
  // live watchers only and counts as dropped.
  void Append(const std::string& job_id, Entry& entry, kiln::v1::JobEvent event);

  // Replays the events from `from_sequence` (from the start when
  // `incarnation` is not this journal's) to `watcher` now; then keeps it for
  // live events, or closes it when the job is `finished`.
  void Watch(const std::string& job_id, Entry& entry, uint64_t from_sequence, uint64_t incarnation,
             std::shared_ptr<JobWatcher> watcher, bool finished);
  void Unwatch(Entry& entry, const JobWatcher* watcher);

  // A job finishes: its log so far is compressed for the store (taken with
  // the next write) and older stored logs past the retention limit go.
  // Call before the job's finished event is appended.
  StoredLog StoreLog(const std::string& job_id, Entry& entry);
  // After the finished event: the job's watchers are closed at the next
  // Release(), and the oldest finished jobs beyond finished_jobs_with_logs
  // drop their log from memory (the store has it).
  void Finished(Entry& entry);

  // Recovery, before anything else: a finished job's stored log, in any
  // order; then SortRecovered() once.
  void RecoverStoredLog(const std::string& job_id, int64_t finished_at_seconds, uint64_t bytes);
  void SortRecovered();

  // The job's log lines kept in memory, in order, and how many were dropped.
  void AppendLogLines(const Entry& entry, google::protobuf::RepeatedPtrField<kiln::v1::LogLine>& out) const;
  uint32_t dropped_log_lines(const Entry& entry) const { return entry.dropped_log_lines; }

  // Group commit: the logs to store and the ones to delete move into the
  // caller's write; if that write fails they come back, in order.
  void TakeLogWrites(std::vector<std::pair<std::string, std::string>>& logs, std::vector<std::string>& deletes);
  void ReturnLogWrites(std::vector<std::pair<std::string, std::string>>& logs, std::vector<std::string>& deletes);

  // The write is stored: events and closes waiting for it go out, in order.
  void Release();

  // Closes the entry's watchers now (shutdown).
  void CloseWatchers(Entry& entry, const absl::Status& status);

  uint64_t stored_log_bytes() const { return stored_log_bytes_; }

 private:
  struct PendingCall {
    std::shared_ptr<JobWatcher> watcher;
    bool close = false;  // Else OnEvent(event).
    kiln::v1::JobEvent event;
  };

  const Clock* const clock_;
  const uint64_t incarnation_;
  const JobJournalOptions options_;
  std::vector<PendingCall> pending_calls_;
  // Finished jobs' logs for the next write, and logs it deletes.
  std::vector<std::pair<std::string, std::string>> pending_logs_;
  std::vector<std::string> pending_log_deletes_;
  // Jobs with a stored log, oldest finished first, and each one's size.
  std::deque<std::pair<std::string, uint64_t>> stored_logs_;
  std::vector<std::pair<int64_t, std::pair<std::string, uint64_t>>> recovered_;
  uint64_t stored_log_bytes_ = 0;
  // Finished jobs still holding their log in memory, oldest first.
  std::deque<Entry*> finished_with_logs_;
};

}  // namespace kiln
