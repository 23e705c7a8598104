#include "coordinator/build_coordinator.h"

#include <algorithm>
#include <set>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "coordinator/rocks_status.h"
#include "coordinator/scheduling_inputs.h"

namespace kiln {

using kiln::state::v1::JobRecord;
using kiln::v1::BuildResult;
using kiln::v1::JobEvent;
using kiln::v1::JobState;

namespace {

absl::string_view ResultLabel(JobState state) {
  switch (state) {
    case kiln::v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case kiln::v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "failed";
  }
}

void CountPush(CoordinatorMetrics& metrics, const kiln::v1::PushResult& push) {
  metrics.push_bytes.Increment(static_cast<double>(std::max<int64_t>(push.bytes_uploaded(), 0)));
  auto count = [&](const kiln::v1::PushedBlob& blob) {
    metrics.PushBlobs(blob.mounted() ? "mounted" : blob.skipped() ? "skipped" : "pushed").Increment();
  };
  if (push.has_config()) count(push.config());
  for (const kiln::v1::PushedBlob& layer : push.layers()) count(layer);
}

}  // namespace

BuildCoordinator::BuildCoordinator(StateStore* store, CoordinatorMetrics* metrics, const Clock* clock,
                                   BuildCoordinatorOptions options, BlobStore* cas)
    : store_(store),
      cas_(cas),
      metrics_(metrics),
      clock_(clock),
      options_(std::move(options)),
      started_(clock_->Now()),
      // Distinct per start: the start time in nanoseconds (never 0, which
      // a watcher that saw no event sends). The wall clock, not the
      // injected one: it must differ between two runs of a test too.
      journal_(clock_, static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())),
               JobJournalOptions{.log_bytes_per_job = options_.log_bytes_per_job,
                                 .finished_jobs_with_logs = options_.finished_jobs_with_logs,
                                 .log_retention_bytes = options_.log_retention_bytes}),
      registry_(clock_, WorkerRegistryOptions{.heartbeat_interval = options_.heartbeat_interval,
                                              .lease = options_.lease,
                                              .max_worker_jobs = options_.max_worker_jobs,
                                              .min_store_free_bytes = options_.min_store_free_bytes,
                                              .min_work_dir_free_bytes = options_.min_work_dir_free_bytes,
                                              .max_memory_used_fraction = options_.max_memory_used_fraction,
                                              .max_load_per_slot = options_.max_load_per_slot}),
      validator_(SubmissionLimits{.max_source_bytes = options_.max_source_bytes,
                                  .max_tree_bytes = options_.max_tree_bytes,
                                  .max_targets = options_.max_targets,
                                  .max_active_jobs_per_token = options_.max_active_jobs_per_token,
                                  .priority_names = options_.priority_names,
                                  .push_allow = options_.push_allow},
                 cas),
      sources_(store, cas,
               SourceReaderLimits{.max_source_bytes = options_.max_source_bytes,
                                  .max_tree_bytes = options_.max_tree_bytes,
                                  .inline_source_bytes = options_.inline_source_bytes}) {
  metrics_->state_writable.Set(1);
}

bool BuildCoordinator::OutputsInCas(const BuildResult& result) const {
  if (cas_ == nullptr || result.output_trees_size() != result.outputs_size()) return false;
  for (const auto& [name, tree] : result.output_trees()) {
    if (!cas_->HasDirectory(tree)) return false;
  }
  return true;
}

void BuildCoordinator::Admit(const std::string& id, Job& job, const JobRecord& record) {
  JobEvent event;
  event.mutable_queued()->set_attempt(record.attempt());
  const WorkGraph::Admitted admitted = graph_.Admit(id, record);
  if (!admitted.shares_with.empty()) {
    event.mutable_queued()->set_reason(WorkGraph::SharingReason(admitted.shares_with));
  } else {
    scheduler_.Enqueue(id, RequirementsOf(record.spec()), PlacementOf(record));
  }
  Emit(id, job, std::move(event));
}

absl::Status BuildCoordinator::Recover() {
  ASSIGN_OR_RETURN(const StoredCounters counters, store_->LoadCounters(), "load the id counters");
  graph_.SetCounters(counters.next_job_seq, counters.next_buildset_seq);
  size_t queued = 0, held = 0;
  const size_t expected = static_cast<size_t>(counters.next_job_seq - 1);
  graph_.Reserve(expected);
  scheduler_.Reserve(expected);
  // One record parsed at a time into the same message (no allocation once
  // warm); the graph keeps the serialized form.
  JobRecord record;
  RETURN_IF_ERROR_CONTEXT(store_->ForEachPackedJob([&](absl::string_view bytes) {
    if (!record.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      return absl::DataLossError("unreadable job record");
    }
    const std::string& id = record.job_id();
    Job& job = graph_.Load(bytes, record, clock_->Now());
    const JobState state = record.state();
    if (IsTerminal(state)) {
      if (record.stored_log_bytes() > 0) {
        journal_.RecoverStoredLog(id, record.finished_at().seconds(), static_cast<uint64_t>(record.stored_log_bytes()));
      }
      JobEvent event;
      auto* finished = event.mutable_finished();
      finished->set_state(state);
      *finished->mutable_result() = record.result();
      finished->set_worker(record.worker());
      Emit(id, job, std::move(event));
    } else if (state == kiln::v1::JOB_STATE_QUEUED) {
      Admit(id, job, record);
      ++queued;
    } else {
      // It was on a worker whose stream died with the old process: hold it
      // for that worker's return, for one lease.
      scheduler_.Reattach(id, record.worker());
      graph_.HoldItem(id, record);
      registry_.Hold(record.worker());
      JobEvent event;
      event.mutable_assigned()->set_worker(record.worker());
      event.mutable_assigned()->set_attempt(record.attempt());
      Emit(id, job, std::move(event));
      ++held;
    }
    return absl::OkStatus();
  }),
                          "load the stored jobs");
  journal_.SortRecovered();
  metrics_->stored_log_bytes.Set(static_cast<double>(journal_.stored_log_bytes()));
  LogInfo(kComponent, "recovered ", graph_.size(), " jobs (", queued, " queued, ", held,
          " held for their workers to reconnect)");
  UpdateGauges();
  return absl::OkStatus();
}

absl::Status BuildCoordinator::StoreInlineTrees(const CheckedSubmission& checked) {
  // Inline trees go into the CAS like uploaded ones (files, then directories
  // children first), so the next submission of the same tree need not send
  // it. Content-addressed: stored before the jobs, harmless if they fail.
  const BlobLookup lookup = checked.Lookup();
  const SourceTreeLimits limits{.max_total_bytes = options_.max_source_bytes};
  for (const auto& [root, hashes] : checked.inline_trees) {
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
        CollectTreeDirectories(root, lookup, limits);
    if (!dirs.ok()) return dirs.status();
    absl::flat_hash_set<std::string> dir_hashes;
    for (const auto& [hash, _] : *dirs) dir_hashes.insert(hash);
    absl::Status s;
    // The hashes are known (each blob matched its digest on arrival); the
    // CAS checks them once more as it stores, as it does every upload.
    const auto put = [&](const std::string& hash, const std::string& data, bool is_directory) {
      kiln::v1::Digest digest;
      digest.set_hash(hash);
      digest.set_size_bytes(static_cast<int64_t>(data.size()));
      bool stored = false;
      s = cas_->Put(digest, data, is_directory, &stored);
      if (stored) {
        metrics_->cas_uploaded_blobs.Increment();
        metrics_->cas_uploaded_bytes.Increment(static_cast<double>(data.size()));
      }
    };
    for (const std::string& hash : hashes) {
      if (s.ok() && !dir_hashes.contains(hash)) put(hash, *checked.uploads.at(hash), false);
    }
    for (auto it = dirs->rbegin(); s.ok() && it != dirs->rend(); ++it) put(it->first, it->second, true);
    if (IsDiskFull(s)) {
      StopWrites(s);
      return OutOfSpace();
    }
    if (!s.ok()) {
      metrics_->state_write_errors.Increment();
      return absl::UnavailableError(absl::StrCat("the coordinator could not store the source: ", s.message()));
    }
  }
  return absl::OkStatus();
}

std::unique_ptr<JobRecord> BuildCoordinator::NewRecord(const kiln::v1::SubmitBuildRequest& request, int i,
                                                       const std::string& token, const BlobLookup& lookup,
                                                       absl::Time now) {
  auto owned = std::make_unique<JobRecord>();
  JobRecord& r = *owned;
  r.set_job_id(graph_.NextJobId(static_cast<size_t>(i)));
  r.set_buildset_id(graph_.NextBuildsetId());
  *r.mutable_spec() = request.targets(i).spec();
  if (!r.spec().priority_class().empty()) {
    r.mutable_spec()->set_priority(validator_.PriorityOf(r.spec().priority_class()));
  }
  if (r.spec().priority() == kiln::v1::PRIORITY_UNSPECIFIED) r.mutable_spec()->set_priority(kiln::v1::PRIORITY_CI);
  if (!r.spec().has_timeout() && options_.default_timeout > absl::ZeroDuration()) {
    *r.mutable_spec()->mutable_timeout() = ToProtoDuration(options_.default_timeout);
  }
  r.set_state(kiln::v1::JOB_STATE_QUEUED);
  *r.mutable_submitted_at() = ToProtoTime(now);
  r.set_submitter(token.empty() ? request.submitter() : absl::StrCat(request.submitter(), " (token ", token, ")"));
  r.set_token(token);
  // The result cache: an identical target built before ends here, as
  // succeeded, with that build's result. A push is never answered from the
  // cache: its tags may have moved since (a revert must push again). The
  // worker finds the output in its store and the registry has every blob,
  // so it costs a few requests.
  const bool ordinary_build = r.spec().fod_task().mode() == kiln::v1::FodTask::MODE_BUILD && !r.spec().has_push();
  std::optional<kiln::v1::Digest> subtree = sources_.FlakeSubtree(r.spec().source(), lookup);
  if (!subtree.has_value() || !ordinary_build) return owned;
  if (r.spec().rebuild()) {
    metrics_->ResultCacheLookups("bypassed").Increment();
    return owned;
  }
  absl::StatusOr<kiln::state::v1::CachedResult> hit = store_->GetCachedResult(WorkGraph::ResultKey(*subtree, r.spec()));
  // (A result without its outputs in the CAS cannot serve --out-link.)
  if (!hit.ok() || (r.spec().fetch_outputs() && !OutputsInCas(hit->result()))) {
    metrics_->ResultCacheLookups("miss").Increment();
    return owned;
  }
  metrics_->ResultCacheLookups("hit").Increment();
  r.set_state(kiln::v1::JOB_STATE_SUCCEEDED);
  *r.mutable_result() = hit->result();
  r.mutable_result()->set_cached(true);
  r.mutable_result()->set_cached_from_job(hit->job_id());
  r.set_worker(hit->worker());
  *r.mutable_finished_at() = ToProtoTime(now);
  return owned;
}

absl::StatusOr<kiln::v1::SubmitBuildResponse> BuildCoordinator::Submit(const kiln::v1::SubmitBuildRequest& request,
                                                                       const std::string& token) {
  auto reject = [&](absl::Status status) {
    metrics_->submissions_rejected.Increment();
    return status;
  };
  // (An empty request is refused for what it is, even while out of space.)
  if (!request.targets().empty() && !EnsureWritable()) return reject(OutOfSpace());
  // Once workers have had time to reconnect after a start, targets none of
  // them could ever build are refused rather than queued forever.
  const bool grace_over = clock_->Now() - started_ >= options_.capability_grace;
  absl::StatusOr<CheckedSubmission> checked =
      validator_.Check(request, token, graph_.ActiveOf(token), grace_over ? &scheduler_ : nullptr);
  if (!checked.ok()) return reject(checked.status());
  if (absl::Status s = StoreInlineTrees(*checked); !s.ok()) return reject(s);

  // Build every record, store them in one batch, and only then make them live.
  const absl::Time now = clock_->Now();
  const BlobLookup lookup = checked->Lookup();
  std::vector<std::pair<std::unique_ptr<JobRecord>, std::string>> records;  // Parsed, serialized.
  records.reserve(request.targets_size());
  for (int i = 0; i < request.targets_size(); ++i) {
    std::unique_ptr<JobRecord> r = NewRecord(request, i, token, lookup, now);
    std::string bytes = r->SerializeAsString();
    records.emplace_back(std::move(r), std::move(bytes));
  }
  StateWrite write;
  write.blobs = std::move(checked->blobs);
  for (const auto& [r, bytes] : records) write.packed_jobs.emplace_back(&r->job_id(), &bytes);
  write.next_job_seq = graph_.next_job_seq() + records.size();
  write.next_buildset_seq = graph_.next_buildset_seq() + 1;
  if (absl::Status s = store_->Commit(write); !s.ok()) {
    if (IsDiskFull(s)) {
      StopWrites(s);
      return reject(OutOfSpace());
    }
    metrics_->state_write_errors.Increment();
    LogError(kComponent, "cannot store submission: ", s.ToString());
    return reject(absl::UnavailableError(absl::StrCat("the coordinator could not store the build: ", s.message())));
  }
  const std::string buildset_id = graph_.NextBuildsetId();
  graph_.Accept(records.size());

  kiln::v1::SubmitBuildResponse response;
  response.set_buildset_id(buildset_id);
  for (auto& [r, bytes] : records) {
    const std::string id = r->job_id();
    response.add_job_ids(id);
    Job& job = graph_.Add(std::move(r), std::move(bytes), now);
    metrics_->jobs_submitted.Increment();
    const JobRecord& rec = *job.parsed;
    if (rec.state() == kiln::v1::JOB_STATE_SUCCEEDED) {
      // From the result cache: finished already, nothing to run.
      metrics_->JobsFinished("succeeded").Increment();
      JobEvent event;
      auto* finished = event.mutable_finished();
      finished->set_state(kiln::v1::JOB_STATE_SUCCEEDED);
      *finished->mutable_result() = rec.result();
      finished->set_worker(rec.worker());
      *finished->mutable_queue_time() = ToProtoDuration(absl::ZeroDuration());
      Emit(id, job, std::move(event));
      continue;
    }
    Admit(id, job, rec);
  }
  LogInfo(kComponent, "buildset ", buildset_id, ": accepted ", records.size(), " job(s) from '", request.submitter(),
          "'");
  EndOfCall();
  return response;
}

absl::Status BuildCoordinator::Watch(const std::string& job_id, uint64_t from_sequence, uint64_t incarnation,
                                     std::shared_ptr<JobWatcher> watcher) {
  Flush();  // The replay below shows only stored states.
  Job* job = graph_.Find(job_id);
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  journal_.Watch(job_id, job->journal, from_sequence, incarnation, std::move(watcher),
                 IsTerminal(graph_.Rec(*job).state()));
  return absl::OkStatus();
}

void BuildCoordinator::Unwatch(const std::string& job_id, const JobWatcher* watcher) {
  if (Job* job = graph_.Find(job_id); job != nullptr) journal_.Unwatch(job->journal, watcher);
}

absl::StatusOr<JobState> BuildCoordinator::Cancel(const std::string& job_id) {
  Job* found = graph_.Find(job_id);
  if (found == nullptr) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  Job& job = *found;
  const JobState state = graph_.Rec(job).state();
  if (IsTerminal(state)) return state;
  if (state == kiln::v1::JOB_STATE_QUEUED) {
    scheduler_.Dequeue(job_id);
  } else if (WorkerEntry* worker = registry_.ByName(graph_.Rec(job).worker()); worker != nullptr) {
    // The slot stays taken until the worker confirms the build is gone.
    kiln::v1::CoordinatorMessage message;
    message.mutable_cancel()->set_job_id(job_id);
    message.mutable_cancel()->set_attempt(graph_.Rec(job).attempt());
    message.mutable_cancel()->set_reason("cancelled by request");
    registry_.Send(*worker, std::move(message));
  }
  BuildResult result;
  result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
  result.set_error_message("cancelled by request");
  Finish(job, kiln::v1::JOB_STATE_CANCELLED, std::move(result));
  UpdateGauges();
  EndOfCall();
  return kiln::v1::JOB_STATE_CANCELLED;
}

absl::StatusOr<kiln::v1::Job> BuildCoordinator::GetJob(const std::string& job_id) const {
  const Job* found = graph_.Find(job_id);
  if (found == nullptr) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord scratch;
  const JobRecord& r = WorkGraph::View(*found, scratch);
  const std::string runner = graph_.RunnerOf(job_id, r);
  kiln::v1::Job job;
  job.set_job_id(r.job_id());
  job.set_buildset_id(r.buildset_id());
  *job.mutable_spec() = r.spec();
  job.set_state(r.state());
  job.set_attempt(r.attempt());
  job.set_worker(r.worker());
  *job.mutable_result() = r.result();
  *job.mutable_submitted_at() = r.submitted_at();
  *job.mutable_finished_at() = r.finished_at();
  job.set_waiting_reason(runner.empty() ? scheduler_.WaitingReason(job_id, clock_->Now())
                                        : WorkGraph::SharingReason(runner));
  return job;
}

absl::StatusOr<kiln::v1::Buildset> BuildCoordinator::GetBuildset(const std::string& buildset_id) const {
  const std::vector<std::string>* jobs = graph_.BuildsetJobs(buildset_id);
  if (jobs == nullptr) return absl::NotFoundError(absl::StrCat("no buildset ", buildset_id));
  kiln::v1::Buildset out;
  out.set_buildset_id(buildset_id);
  for (const std::string& id : *jobs) *out.add_jobs() = *GetJob(id);
  return out;
}

absl::Status BuildCoordinator::GetJobLog(const std::string& job_id, bool have_stored,
                                         kiln::v1::GetJobLogResponse* out) const {
  const Job* job = graph_.Find(job_id);
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord scratch;
  const JobRecord& r = WorkGraph::View(*job, scratch);
  out->set_state(r.state());
  out->set_expired(r.log_expired());
  // A job that built nothing itself points to the job whose build it shared.
  if (!r.log_job_id().empty()) {
    out->set_log_job_id(r.log_job_id());
  } else if (r.result().cached()) {
    out->set_log_job_id(r.result().cached_from_job());
  } else if (std::string runner = graph_.RunnerOf(job_id, r); !runner.empty()) {
    out->set_log_job_id(runner);
  }
  // A finished job's log comes from the store; the copy in memory serves
  // only jobs still running (or one finishing between the caller's read of
  // the store and this call).
  if (have_stored) return absl::OkStatus();
  journal_.AppendLogLines(job->journal, *out->mutable_lines());
  out->set_dropped_lines(journal_.dropped_log_lines(job->journal));
  return absl::OkStatus();
}

kiln::v1::ListBuildsetsResponse BuildCoordinator::ListBuildsets(size_t limit) const {
  return graph_.ListBuildsets(limit);
}

std::vector<std::string> BuildCoordinator::RecentOutputs(size_t buildsets) const {
  std::vector<std::string> out;
  const kiln::v1::ListBuildsetsResponse recent = graph_.ListBuildsets(buildsets);
  for (const kiln::v1::BuildsetSummary& summary : recent.buildsets()) {
    absl::StatusOr<kiln::v1::Buildset> set = GetBuildset(summary.buildset_id());
    if (!set.ok()) continue;
    for (const kiln::v1::Job& job : set->jobs()) {
      for (const auto& [name, path] : job.result().outputs()) out.push_back(path);
    }
  }
  return out;
}

absl::StatusOr<kiln::v1::Buildset> BuildCoordinator::CancelBuildset(const std::string& buildset_id) {
  const std::vector<std::string>* jobs = graph_.BuildsetJobs(buildset_id);
  if (jobs == nullptr) return absl::NotFoundError(absl::StrCat("no buildset ", buildset_id));
  const std::vector<std::string> ids = *jobs;
  for (const std::string& id : ids) {
    if (absl::StatusOr<JobState> s = Cancel(id); !s.ok()) return s.status();
  }
  return GetBuildset(buildset_id);
}

void BuildCoordinator::Dispatch() {
  const absl::Time round_start = absl::Now();  // The round's own cost, for its histogram.
  std::vector<Assignment> assignments = scheduler_.Assign(clock_->Now());
  if (assignments.empty()) return;
  auto observe =
      absl::MakeCleanup([&] { metrics_->dispatch_duration.Observe(absl::ToDoubleSeconds(absl::Now() - round_start)); });
  const absl::Time now = clock_->Now();
  for (const Assignment& a : assignments) {
    Job& job = *graph_.Find(a.job);
    graph_.MarkAssigned(job, a.worker);  // Announced after the flush's write.
    metrics_->queue_wait.Observe(absl::ToDoubleSeconds(now - job.queued_at));
  }
  for (const Assignment& a : assignments) {
    Job& job = *graph_.Find(a.job);
    const JobRecord& r = graph_.Rec(job);
    kiln::v1::Assignment assign;
    assign.set_job_id(a.job);
    assign.set_attempt(r.attempt());
    *assign.mutable_spec() = r.spec();
    if (absl::Status s = sources_.Attach(r.spec(), assign); !s.ok()) {
      LogError(ForJob(a.job), kComponent, "source unavailable: ", s.ToString());
      scheduler_.Release(a.job, a.worker);
      BuildResult result;
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(absl::StrCat("the coordinator lost the job's source: ", s.message()));
      Finish(job, kiln::v1::JOB_STATE_FAILED, std::move(result));
      continue;
    }
    JobEvent event;
    event.mutable_assigned()->set_worker(a.worker);
    event.mutable_assigned()->set_attempt(r.attempt());
    Emit(a.job, job, std::move(event));
    WorkerEntry* worker = registry_.ByName(a.worker);
    KILN_CHECK(worker != nullptr);  // The scheduler places only on connected workers.
    registry_.Assign(*worker, std::move(assign));
  }
}

void BuildCoordinator::Requeue(Job& job, absl::string_view reason_label, const std::string& reason, bool backoff) {
  const std::string id = graph_.Rec(job).job_id();
  std::optional<absl::Time> not_before = graph_.Requeue(
      job, reason, options_.max_attempts, backoff ? options_.retry_backoff : absl::ZeroDuration(), clock_->Now());
  if (!not_before.has_value()) {
    BuildResult result;
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(absl::StrCat("gave up after ", graph_.Rec(job).attempt(), " attempts; last: ", reason));
    Finish(job, kiln::v1::JOB_STATE_FAILED, std::move(result));
    return;
  }
  JobPlacement placement = PlacementOf(graph_.Rec(job));
  placement.not_before = *not_before;
  scheduler_.Enqueue(id, RequirementsOf(graph_.Rec(job).spec()), std::move(placement), /*front=*/true);
  metrics_->Requeues(reason_label).Increment();
  JobEvent event;
  event.mutable_queued()->set_attempt(graph_.Rec(job).attempt());
  event.mutable_queued()->set_reason(reason);
  Emit(id, job, std::move(event));
}

void BuildCoordinator::Finish(Job& job, JobState state, BuildResult result) {
  const std::string id = graph_.Rec(job).job_id();
  const std::vector<std::string> waiting = graph_.Leave(id, graph_.Rec(job)).waiting;
  // Once per push that ran, not per job that shared it.
  if (result.has_push()) CountPush(*metrics_, result.push());
  FinishOne(job, state, std::move(result));
  if (waiting.empty()) return;
  if (state == kiln::v1::JOB_STATE_CANCELLED) {
    // Someone else still wants this build: the first waiting job runs it now.
    for (const std::string& w : waiting) {
      Job& next = *graph_.Find(w);
      Admit(w, next, graph_.Rec(next));
    }
    return;
  }
  const JobRecord& done = graph_.Rec(job);
  for (const std::string& w : waiting) {
    Job& sharer = *graph_.Find(w);
    JobRecord& r = graph_.Rec(sharer);
    r.set_worker(done.worker());
    r.set_attempt(done.attempt());
    r.set_log_job_id(id);
    FinishOne(sharer, state, done.result());
  }
}

void BuildCoordinator::FinishOne(Job& job, JobState state, BuildResult result) {
  graph_.End(job, state, std::move(result), clock_->Now());
  StoreLog(job);
  const JobRecord& done = graph_.Rec(job);
  // For the result cache, stored with the job's final state. The key is
  // computed again rather than kept in every queued job (66 bytes each).
  if (state == kiln::v1::JOB_STATE_SUCCEEDED && !done.result().cached() &&
      done.spec().fod_task().mode() == kiln::v1::FodTask::MODE_BUILD) {
    const BlobLookup none = [](const std::string&) -> const std::string* { return nullptr; };
    if (std::optional<kiln::v1::Digest> subtree = sources_.FlakeSubtree(done.spec().source(), none)) {
      graph_.CacheResult(WorkGraph::ResultKey(*subtree, done.spec()), done);
    }
  }
  metrics_->JobsFinished(ResultLabel(state)).Increment();
  JobEvent event;
  auto* finished = event.mutable_finished();
  finished->set_state(state);
  *finished->mutable_result() = done.result();
  finished->set_worker(done.worker());
  *finished->mutable_queue_time() =
      ToProtoDuration(FromProtoTime(done.finished_at()) - FromProtoTime(done.submitted_at()));
  Emit(done.job_id(), job, std::move(event));
  journal_.Finished(job.journal);
  LogInfo(ForJob(done.job_id()), kComponent, "(", done.spec().display_name(), ") ", ResultLabel(state),
          done.worker().empty() ? "" : " on ", done.worker());
}

void BuildCoordinator::StoreLog(Job& job) {
  JobJournal::StoredLog stored = journal_.StoreLog(graph_.Rec(job).job_id(), job.journal);
  if (stored.bytes > 0) graph_.Rec(job).set_stored_log_bytes(stored.bytes);
  for (const std::string& id : stored.expired) {
    Job* old = graph_.Find(id);
    if (old == nullptr) continue;
    JobRecord& r = graph_.Rec(*old);
    r.set_stored_log_bytes(0);
    r.set_log_expired(true);
    graph_.Persist(*old);
    metrics_->logs_expired.Increment();
  }
  metrics_->stored_log_bytes.Set(static_cast<double>(journal_.stored_log_bytes()));
}

void BuildCoordinator::Emit(const std::string& id, Job& job, JobEvent event) {
  journal_.Append(id, job.journal, std::move(event));
}

}  // namespace kiln
