// BuildCoordinator, its upkeep: the group commit and what happens while the
// store takes no writes, the periodic tick (leases, the capability grace
// window, CAS garbage collection), gauges and shutdown.
#include "coordinator/build_coordinator.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "coordinator/rocks_status.h"
#include "coordinator/scheduling_inputs.h"

namespace kiln {

using kiln::state::v1::JobRecord;
using kiln::v1::BuildResult;
using kiln::v1::JobEvent;
using kiln::v1::JobState;

bool BuildCoordinator::EnsureWritable() {
  if (state_writable_.load()) {
    // Stop at the reserve, so RocksDB's own log never meets a full disk (it
    // could not resume from that without a restart).
    if (options_.min_free_bytes == 0) return true;
    const uint64_t free_bytes = store_->FreeBytes();
    if (free_bytes >= options_.min_free_bytes) return true;
    StopWrites(
        absl::ResourceExhaustedError(absl::StrFormat("%d MiB free on its state directory, below the reserve of %d MiB",
                                                     free_bytes >> 20, options_.min_free_bytes >> 20)),
        /*write_failed=*/false);
    return false;
  }
  const absl::Time now = clock_->Now();
  if (now < next_resume_) return false;
  next_resume_ = now + absl::Seconds(1);
  // Not at the first free byte: a few writes would fill it again.
  if (const uint64_t free_bytes = store_->FreeBytes(); free_bytes < options_.resume_min_free_bytes) {
    state_error_ = absl::StrFormat("%d MiB free on its state directory; it resumes at %d MiB", free_bytes >> 20,
                                   options_.resume_min_free_bytes >> 20);
    return false;
  }
  if (absl::Status s = store_->Resume(); !s.ok()) {
    state_error_ = std::string(s.message());
    return false;
  }
  state_writable_.store(true);
  metrics_->state_writable.Set(1);
  LogInfo(kComponent, "state writes resumed");
  return true;
}

void BuildCoordinator::StopWrites(const absl::Status& why, bool write_failed) {
  if (write_failed) metrics_->state_write_errors.Increment();
  state_error_ = std::string(why.message());
  if (state_writable_.exchange(false)) {
    LogError(kComponent, write_failed ? "state write failed" : "state writes stopped",
             "; taking no new work and announcing nothing until writes resume: ", why.ToString());
  }
  metrics_->state_writable.Set(0);
  next_resume_ = clock_->Now() + absl::Seconds(1);
}

absl::Status BuildCoordinator::OutOfSpace() const {
  return absl::ResourceExhaustedError(
      absl::StrCat(kCoordinatorOutOfSpace, ": it cannot store new work (", state_error_,
                   "); it takes submissions again by itself once space is freed on its state directory"));
}

void BuildCoordinator::Flush() {
  if (flushing_) return;
  // While the store takes no writes, everything waits: the state changes,
  // and the events and messages that would announce them.
  if (!EnsureWritable()) return;
  flushing_ = true;
  Dispatch();  // Every slot freed since the last flush, in one round.
  if (graph_.has_writes()) {
    StateWrite write;
    graph_.TakeWrites(write.packed_jobs, write.cached_results);
    journal_.TakeLogWrites(write.logs, write.deleted_logs);
    if (absl::Status s = store_->Commit(write); !s.ok()) {
      // Kept to be written again once the store resumes; until then nobody
      // hears of these changes, so a restart loses nothing anyone was told.
      graph_.WriteFailed();
      journal_.ReturnLogWrites(write.logs, write.deleted_logs);
      StopWrites(s);
      flushing_ = false;
      return;
    }
    graph_.Committed();
  }
  graph_.DropParsed();
  // Stored: now the world may hear of it.
  journal_.Release();
  registry_.DeliverOutboxes();
  flushing_ = false;
}

absl::StatusOr<uint64_t> BuildCoordinator::CollectGarbage() {
  if (cas_ == nullptr) return 0;
  last_gc_ = clock_->Now();
  // Everything the trees of queued and running jobs name is kept.
  absl::flat_hash_set<std::string> roots, keep;
  JobRecord scratch;
  scheduler_.ForEachLiveJob([&](const std::string& id) {
    if (const Job* job = graph_.Find(id); job != nullptr) {
      roots.insert(WorkGraph::View(*job, scratch).spec().source().tree_root().SerializeAsString());
    }
  });
  absl::flat_hash_map<std::string, std::string> read;
  const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    if (auto it = read.find(hash); it != read.end()) return &it->second;
    absl::StatusOr<std::string> blob = cas_->ReadAll(hash);
    if (!blob.ok()) return nullptr;
    return &read.emplace(hash, *std::move(blob)).first->second;
  };
  SourceTreeLimits limits;
  limits.max_total_bytes = UINT64_MAX;
  limits.max_entries = uint64_t{1} << 26;
  limits.max_entries_per_directory = uint64_t{1} << 20;
  for (const std::string& serialized : roots) {
    kiln::v1::Digest root;
    root.ParseFromString(serialized);
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
        CollectTreeDirectories(root, lookup, limits);
    if (!dirs.ok()) continue;  // Already incomplete: nothing of it to save.
    for (const auto& [hash, data] : *dirs) {
      keep.insert(hash);
      kiln::v1::Directory dir;
      if (!dir.ParseFromString(data)) continue;
      for (const auto& f : dir.files()) keep.insert(f.digest().hash());
    }
    read.clear();
  }
  const uint64_t target = options_.cas_max_bytes / 10 * 9;
  absl::StatusOr<uint64_t> freed =
      // Blob times are wall-clock times (the CAS's own), not the scheduler clock.
      cas_->CollectGarbage(keep, absl::ToUnixSeconds(absl::Now() - options_.cas_gc_grace), target);
  if (freed.ok()) {
    metrics_->cas_gc_runs.Increment();
    metrics_->cas_gc_freed_bytes.Increment(static_cast<double>(*freed));
    LogInfo(kComponent, "CAS garbage collection: freed ", *freed, " bytes, ", cas_->total_bytes(), " bytes stored, ",
            keep.size(), " blob(s) of ", roots.size(), " live tree(s) kept");
  } else {
    LogError(kComponent, "CAS garbage collection failed: ", freed.status().ToString());
  }
  return freed;
}

void BuildCoordinator::Tick() {
  CheckLeases();
  FailWhatNoKnownWorkerCanBuild();
  if (cas_ != nullptr && options_.cas_max_bytes > 0 && cas_->total_bytes() > options_.cas_max_bytes &&
      clock_->Now() - last_gc_ >= options_.cas_gc_interval) {
    CollectGarbage().IgnoreError();  // Logged and counted.
  }
  EndOfCall();
}

void BuildCoordinator::FailWhatNoKnownWorkerCanBuild() {
  // Jobs submitted while workers were still reconnecting after a start were
  // not checked against them; once the window is over they are, once, as a
  // new submission would be, instead of waiting forever.
  if (grace_checked_ || clock_->Now() - started_ < options_.capability_grace || !scheduler_.has_known_workers()) {
    return;
  }
  grace_checked_ = true;
  std::vector<std::string> queued;
  scheduler_.ForEachLiveJob([&](const std::string& id) { queued.push_back(id); });
  for (const std::string& id : queued) {
    Job* job = graph_.Find(id);
    if (job == nullptr || graph_.Rec(*job).state() != kiln::v1::JOB_STATE_QUEUED) continue;
    const std::string unmet = scheduler_.UnmetByKnownWorkers(RequirementsOf(graph_.Rec(*job).spec()));
    if (unmet.empty()) continue;
    scheduler_.Dequeue(id);
    BuildResult result;
    result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
    result.set_error_message(absl::StrCat(graph_.Rec(*job).spec().display_name(), ": ", unmet));
    LogWarning(ForJob(id), kComponent, "fails: ", result.error_message());
    Finish(*job, kiln::v1::JOB_STATE_FAILED, std::move(result));
  }
}

void BuildCoordinator::CheckLeases() {
  // A stream that stays open but carries nothing (a dead peer behind a
  // half-open connection) ends here; its lease then runs from last_seen.
  const std::vector<const WorkerSession*> silent = registry_.Silent();
  for (const WorkerSession* session : silent) {
    WorkerEntry* worker = registry_.Find(session);
    if (worker == nullptr) continue;
    worker->session->Close(absl::DeadlineExceededError("no message from the worker within the lease"));
    WorkerGone(session);  // Its lease ran from last_seen: it expires there and then.
  }
  const std::vector<std::string> expired = registry_.ExpiredLeases();
  for (const std::string& name : expired) ExpireLease(name, registry_.LeaseExpiredReason());
  // Flush (by the caller) also places jobs whose retry back-off ended.
  if (!silent.empty() || !expired.empty() || gauges_dirty_) UpdateGauges(/*force=*/true);
}

void BuildCoordinator::UpdateGauges(bool force) {
  // Gauges are scraped every few seconds; refreshing them after every
  // message would cost O(workers) per message under load.
  const absl::Time now = absl::Now();
  if (!force && now - gauges_updated_ < absl::Milliseconds(100)) {
    gauges_dirty_ = true;
    return;
  }
  gauges_updated_ = now;
  gauges_dirty_ = false;
  // Every series set before is set again (to 0 when empty), so none goes stale.
  absl::flat_hash_map<std::pair<int, std::string>, int64_t> queued;
  for (const auto& key : queued_series_) queued[key] = 0;
  const std::set<std::string> systems = scheduler_.KnownSystems();
  for (int cls = 0; cls < kPriorityClasses; ++cls) {
    // "other" always, so the series exist from the first scrape, before any
    // worker has said which systems it builds for.
    queued[{cls, "other"}] = 0;
    for (const std::string& system : systems) queued[{cls, system}] = 0;
  }
  for (const auto& [key, n] : scheduler_.queued_by_class_system()) {
    queued[{key.first, systems.contains(key.second) ? key.second : "other"}] += n;
  }
  for (const auto& [key, n] : queued) {
    queued_series_.insert(key);
    metrics_->JobsQueued(options_.priority_names[key.first], key.second).Set(static_cast<double>(n));
  }
  metrics_->jobs_running.Set(static_cast<double>(scheduler_.running()));
  size_t by_state[3] = {0, 0, 0};  // connected, draining, disconnected
  for (const Scheduler::WorkerView& w : scheduler_.Workers()) ++by_state[!w.online ? 2 : w.draining ? 1 : 0];
  metrics_->Workers("connected").Set(static_cast<double>(by_state[0]));
  metrics_->Workers("draining").Set(static_cast<double>(by_state[1]));
  metrics_->Workers("disconnected").Set(static_cast<double>(by_state[2]));
  metrics_->slots.Set(static_cast<double>(scheduler_.total_slots()));
  metrics_->slots_used.Set(static_cast<double>(scheduler_.used_slots()));
  if (cas_ != nullptr) metrics_->cas_stored_bytes.Set(static_cast<double>(cas_->total_bytes()));
}

void BuildCoordinator::CloseAll() {
  Flush();
  const absl::Status shutting_down = absl::UnavailableError("the coordinator is shutting down");
  graph_.ForEachJob([&](const std::string&, Job& job) { journal_.CloseWatchers(job.journal, shutting_down); });
  registry_.CloseAll(shutting_down);
}

}  // namespace kiln
