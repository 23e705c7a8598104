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
#include "coordinator/rocks_status.h"
#include "coordinator/scheduling_inputs.h"

namespace kiln {

using kiln::state::v1::JobRecord;
using kiln::v1::BuildResult;
using kiln::v1::JobEvent;
using kiln::v1::JobState;

namespace {

constexpr absl::string_view kComponent = "coordinator";

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
  absl::StatusOr<StoredCounters> counters = store_->LoadCounters();
  if (!counters.ok()) return absl::Status(counters.status().code(), absl::StrCat("load counters: ", counters.status().message()));
  graph_.SetCounters(counters->next_job_seq, counters->next_buildset_seq);
  size_t queued = 0, held = 0;
  const size_t expected = static_cast<size_t>(counters->next_job_seq - 1);
  graph_.Reserve(expected);
  scheduler_.Reserve(expected);
  // One record parsed at a time into the same message (no allocation once
  // warm); the graph keeps the serialized form.
  JobRecord record;
  absl::Status loaded = store_->ForEachPackedJob([&](absl::string_view bytes) {
    if (!record.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      return absl::DataLossError("unreadable job record");
    }
    const std::string& id = record.job_id();
    Job& job = graph_.Load(bytes, record, clock_->Now());
    const JobState state = record.state();
    if (IsTerminal(state)) {
      if (record.stored_log_bytes() > 0) {
        journal_.RecoverStoredLog(id, record.finished_at().seconds(),
                                  static_cast<uint64_t>(record.stored_log_bytes()));
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
  });
  if (!loaded.ok()) return absl::Status(loaded.code(), absl::StrCat("load jobs: ", loaded.message()));
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
      MarkUnwritable(s);
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
      MarkUnwritable(s);
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
  LogInfo(kComponent, "buildset ", buildset_id, ": accepted ", records.size(), " job(s) from '",
          request.submitter(), "'");
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

absl::StatusOr<kiln::v1::Buildset> BuildCoordinator::CancelBuildset(const std::string& buildset_id) {
  const std::vector<std::string>* jobs = graph_.BuildsetJobs(buildset_id);
  if (jobs == nullptr) return absl::NotFoundError(absl::StrCat("no buildset ", buildset_id));
  const std::vector<std::string> ids = *jobs;
  for (const std::string& id : ids) {
    if (absl::StatusOr<JobState> s = Cancel(id); !s.ok()) return s.status();
  }
  return GetBuildset(buildset_id);
}

kiln::v1::ListWorkersResponse BuildCoordinator::ListWorkers() const {
  kiln::v1::ListWorkersResponse out;
  for (const Scheduler::WorkerView& w : scheduler_.Workers()) {
    kiln::v1::WorkerInfo* info = out.add_workers();
    info->set_name(w.name);
    info->set_state(!w.online   ? kiln::v1::WORKER_STATE_DISCONNECTED
                    : w.draining ? kiln::v1::WORKER_STATE_DRAINING
                                 : kiln::v1::WORKER_STATE_CONNECTED);
    for (const auto& x : w.caps.systems) info->add_systems(x);
    for (const auto& x : w.caps.supported_features) info->add_supported_features(x);
    for (const auto& x : w.caps.mandatory_features) info->add_mandatory_features(x);
    info->mutable_labels()->insert(w.caps.labels.begin(), w.caps.labels.end());
    info->set_max_jobs(static_cast<uint32_t>(std::max(0, w.caps.max_jobs)));
    info->set_speed_factor(w.caps.speed_factor);
    for (const auto& j : w.jobs) info->add_running_jobs(j);
    if (const WorkerEntry* worker = registry_.ByName(w.name); worker != nullptr) {
      const WorkerEntry& entry = *worker;
      *info->mutable_last_seen() = ToProtoTime(entry.last_seen);
      info->set_load_average(entry.last_heartbeat.load_average());
      info->set_memory_used_fraction(entry.last_heartbeat.memory_used_fraction());
      info->set_store_free_bytes(entry.last_heartbeat.store_free_bytes());
      info->set_work_dir_free_bytes(entry.last_heartbeat.work_dir_free_bytes());
    }
    if (std::optional<absl::Time> until = registry_.lease_until(w.name); until.has_value()) {
      *info->mutable_lease_until() = ToProtoTime(*until);
    }
    info->set_over_limit(w.over_limit);
  }
  return out;
}

absl::StatusOr<kiln::v1::WorkerInfo> BuildCoordinator::DrainWorker(const std::string& name, bool undo) {
  if (!scheduler_.SetDraining(name, !undo)) return absl::NotFoundError(absl::StrCat("no worker named '", name, "'"));
  registry_.SetDrained(name, !undo);
  LogInfo(ForWorker(name), kComponent, undo ? "drain lifted" : "draining (no new jobs)");
  UpdateGauges();
  EndOfCall();
  kiln::v1::ListWorkersResponse all = ListWorkers();
  for (kiln::v1::WorkerInfo& info : *all.mutable_workers()) {
    if (info.name() == name) return std::move(info);
  }
  return absl::NotFoundError(absl::StrCat("no worker named '", name, "'"));
}

void BuildCoordinator::OnWorkerMessage(const std::shared_ptr<WorkerSession>& session,
                                       const kiln::v1::WorkerMessage& message) {
  WorkerEntry& worker = registry_.Seen(session);
  if (worker.name.empty() && !message.has_register_()) {
    session->Close(absl::FailedPreconditionError("the first message on a worker stream must be Register"));
    registry_.Gone(session.get());
    return;
  }
  switch (message.kind_case()) {
    case kiln::v1::WorkerMessage::kRegister:
      HandleRegister(worker, message.register_());
      break;
    case kiln::v1::WorkerMessage::kHeartbeat:
      HandleHeartbeat(worker, message.heartbeat());  // It also renewed the lease (last_seen, above).
      break;
    case kiln::v1::WorkerMessage::kStarted: {
      Job* job = graph_.FindAttempt(worker.name, message.started().job_id(), message.started().attempt());
      if (job == nullptr || graph_.Rec(*job).state() != kiln::v1::JOB_STATE_ASSIGNED) break;
      graph_.MarkStarted(*job, clock_->Now());
      JobEvent event;
      event.mutable_started()->set_worker(worker.name);
      Emit(message.started().job_id(), *job, std::move(event));
      break;
    }
    case kiln::v1::WorkerMessage::kLog: {
      Job* job = graph_.FindAttempt(worker.name, message.log().job_id(), message.log().attempt());
      if (job == nullptr || message.log().lines().empty()) break;
      JobEvent event;
      *event.mutable_log()->mutable_lines() = message.log().lines();
      Emit(message.log().job_id(), *job, std::move(event));
      break;
    }
    case kiln::v1::WorkerMessage::kFinished:
      HandleFinished(worker, message.finished());
      break;
    case kiln::v1::WorkerMessage::KIND_NOT_SET:
      break;
  }
  if (!message.results().empty()) {
    // `worker` is still valid: only Register (above) can drop the entry.
    WorkerEntry* still = registry_.Find(session.get());
    if (still != nullptr && !still->name.empty()) {
      for (const auto& finished : message.results()) HandleFinished(*still, finished);
    }
  }
  UpdateGauges();
  EndOfCall();
}

void BuildCoordinator::HandleRegister(WorkerEntry& worker, const kiln::v1::Register& reg) {
  const WorkerRegistry::Admission admission = registry_.CheckRegister(worker, reg);
  if (!admission.refused.ok()) {
    if (absl::IsAlreadyExists(admission.refused)) {
      LogWarning(ForWorker(reg.name()), kComponent, "refused a second worker with the name of a connected one");
    }
    std::shared_ptr<WorkerSession> session = worker.session;  // `worker` goes with WorkerGone.
    session->Close(admission.refused);
    WorkerGone(session.get());
    return;
  }
  if (admission.replaces != nullptr) {
    registry_.Find(admission.replaces)->session->Close(
        absl::AbortedError("replaced by a newer connection of the same worker"));
    WorkerGone(admission.replaces);
  }
  registry_.Bind(worker, reg);
  scheduler_.AddWorker(worker.name, WorkerRegistry::CapabilitiesOf(reg));
  if (registry_.drained(worker.name)) scheduler_.SetDraining(worker.name, true);
  if (reg.has_initial_load()) HandleHeartbeat(worker, reg.initial_load());
  registry_.Send(worker, registry_.Registered(worker));
  Reconcile(worker, reg);
  LogInfo(ForWorker(worker.name), kComponent, "registered: ", reg.max_jobs(), " slot(s), systems ",
          absl::StrJoin(reg.systems(), ","));
}

bool BuildCoordinator::EnsureWritable() {
  if (state_writable_.load()) return true;
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

void BuildCoordinator::MarkUnwritable(const absl::Status& why) {
  metrics_->state_write_errors.Increment();
  state_error_ = std::string(why.message());
  if (state_writable_.exchange(false)) {
    LogError(kComponent, "state write failed; taking no new work and announcing nothing until writes resume: ",
             why.ToString());
  }
  metrics_->state_writable.Set(0);
  next_resume_ = clock_->Now() + absl::Seconds(1);
}

absl::Status BuildCoordinator::OutOfSpace() const {
  return absl::ResourceExhaustedError(absl::StrCat(
      kCoordinatorOutOfSpace, ": it cannot store new work (", state_error_,
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
      MarkUnwritable(s);
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

void BuildCoordinator::HandleHeartbeat(WorkerEntry& worker, const kiln::v1::Heartbeat& heartbeat) {
  const std::string over =
      registry_.Heartbeat(worker, heartbeat, scheduler_.CapabilitiesOf(worker.name).max_jobs);
  const std::string before = scheduler_.OverLimitOf(worker.name);
  if (over != before) {
    if (over.empty()) {
      LogInfo(ForWorker(worker.name), kComponent, "back under its limits");
    } else {
      LogWarning(ForWorker(worker.name), kComponent, "takes no new jobs: ", over);
    }
    scheduler_.SetOverLimit(worker.name, over);
  }
}

void BuildCoordinator::Reconcile(WorkerEntry& worker, const kiln::v1::Register& reg) {
  absl::flat_hash_map<std::string, uint32_t> reported;
  for (const auto& r : reg.running()) reported[r.job_id()] = r.attempt();
  size_t kept = 0;
  for (const std::string& id : scheduler_.JobsOf(worker.name)) {
    Job& job = *graph_.Find(id);
    auto it = reported.find(id);
    if (it != reported.end() && it->second == graph_.Rec(job).attempt()) {
      reported.erase(it);  // Still running there (or its result is on the way): keep it.
      ++kept;
      continue;
    }
    scheduler_.Release(id, worker.name);
    Requeue(job, "worker_lost", absl::StrCat("worker ", worker.name, " came back without it"));
  }
  if (kept > 0) LogInfo(ForWorker(worker.name), kComponent, "re-attached ", kept, " job(s)");
  // Anything else it has is not its to run any more (requeued, finished or
  // cancelled meanwhile): stop it.
  for (const auto& [id, attempt] : reported) {
    kiln::v1::CoordinatorMessage cancel;
    cancel.mutable_cancel()->set_job_id(id);
    cancel.mutable_cancel()->set_attempt(attempt);
    cancel.mutable_cancel()->set_reason("the job is no longer this worker's attempt");
    registry_.Send(worker, std::move(cancel));
  }
}

void BuildCoordinator::ExpireLease(const std::string& worker, const std::string& why) {
  registry_.EndLease(worker);
  const std::vector<std::string> lost = scheduler_.RemoveWorker(worker);
  LogInfo(ForWorker(worker), kComponent, why, "; requeueing ", lost.size(), " job(s)");
  for (const std::string& id : lost) {
    Job* job = graph_.Find(id);
    if (job != nullptr && !IsTerminal(graph_.Rec(*job).state())) {
      Requeue(*job, "lease_expired", absl::StrCat("worker ", worker, " ", why));
    }
  }
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
    LogInfo(kComponent, "CAS garbage collection: freed ", *freed, " bytes, ", cas_->total_bytes(),
            " bytes stored, ", keep.size(), " blob(s) of ", roots.size(), " live tree(s) kept");
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

void BuildCoordinator::HandleFinished(WorkerEntry& worker, const kiln::v1::JobFinished& finished) {
  // Stored below or ignored as stale: either way the worker may forget it.
  // The acknowledgement goes with the next message to the worker.
  registry_.Ack(worker, finished.job_id(), finished.attempt());
  Job* found = graph_.Find(finished.job_id());
  if (found == nullptr) return;
  Job& job = *found;
  const JobRecord& r = graph_.Rec(job);
  if (r.worker() != worker.name || r.attempt() != finished.attempt()) {
    LogFields about = ForJob(finished.job_id(), finished.attempt());
    about.worker = worker.name;
    LogDebug(about, kComponent, "ignoring a stale result");
    return;
  }
  scheduler_.Release(finished.job_id(), worker.name);
  if (IsTerminal(r.state())) return;  // Cancelled meanwhile.

  const BuildResult& result = finished.result();
  if (r.has_started_at()) {
    metrics_->build_duration.Observe(absl::ToDoubleSeconds(clock_->Now() - FromProtoTime(r.started_at())));
  }
  switch (result.code()) {
    case kiln::v1::RESULT_CODE_SUCCEEDED:
      Finish(job, kiln::v1::JOB_STATE_SUCCEEDED, result);
      break;
    case kiln::v1::RESULT_CODE_CANCELLED:
      Finish(job, kiln::v1::JOB_STATE_CANCELLED, result);
      break;
    case kiln::v1::RESULT_CODE_INFRA_ERROR:
      Requeue(job, "infra_error", absl::StrCat("worker ", worker.name, " could not run it: ", result.error_message()),
              /*backoff=*/true);
      break;
    default:
      Finish(job, kiln::v1::JOB_STATE_FAILED, result);
      break;
  }
}

void BuildCoordinator::OnWorkerGone(const WorkerSession* session) {
  WorkerGone(session);
  EndOfCall();
}

void BuildCoordinator::WorkerGone(const WorkerSession* session) {
  std::optional<WorkerRegistry::Departure> departed = registry_.Gone(session);
  if (!departed.has_value()) return;
  // Hold its jobs: a worker that comes back within the lease keeps them.
  scheduler_.SetOnline(departed->name, false);
  LogInfo(kComponent, "worker ", departed->name, " disconnected; holding its ",
          scheduler_.JobsOf(departed->name).size(), " job(s) until ", absl::FormatTime(departed->lease_until));
  // A lease already over (zero, or a silent worker's) expires at once. Not
  // through CheckLeases: that may be our caller, looping over sessions.
  if (departed->lease_over) ExpireLease(departed->name, registry_.LeaseExpiredReason());
  UpdateGauges(/*force=*/departed->lease_over);
}

void BuildCoordinator::CloseAll() {
  Flush();
  const absl::Status shutting_down = absl::UnavailableError("the coordinator is shutting down");
  graph_.ForEachJob([&](const std::string&, Job& job) { journal_.CloseWatchers(job.journal, shutting_down); });
  registry_.CloseAll(shutting_down);
}

void BuildCoordinator::Dispatch() {
  const absl::Time round_start = absl::Now();  // The round's own cost, for its histogram.
  std::vector<Assignment> assignments = scheduler_.Assign(clock_->Now());
  if (assignments.empty()) return;
  auto observe = absl::MakeCleanup(
      [&] { metrics_->dispatch_duration.Observe(absl::ToDoubleSeconds(absl::Now() - round_start)); });
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
  std::optional<absl::Time> not_before =
      graph_.Requeue(job, reason, options_.max_attempts, backoff ? options_.retry_backoff : absl::ZeroDuration(),
                     clock_->Now());
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

}  // namespace kiln
