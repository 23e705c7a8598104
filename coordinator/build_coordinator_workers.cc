// BuildCoordinator, the workers' side: their streams' messages, registration,
// heartbeats, reconnects, results and departures; the operators' view.
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

kiln::v1::ListWorkersResponse BuildCoordinator::ListWorkers() const {
  kiln::v1::ListWorkersResponse out;
  for (const Scheduler::WorkerView& w : scheduler_.Workers()) {
    kiln::v1::WorkerInfo* info = out.add_workers();
    info->set_name(w.name);
    info->set_state(!w.online    ? kiln::v1::WORKER_STATE_DISCONNECTED
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
    case kiln::v1::WorkerMessage::kRegister: HandleRegister(worker, message.register_()); break;
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
    case kiln::v1::WorkerMessage::kFinished: HandleFinished(worker, message.finished()); break;
    case kiln::v1::WorkerMessage::KIND_NOT_SET: break;
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

void BuildCoordinator::OnWorkerLogs(const std::string& worker, const kiln::v1::LogBatch& batch) {
  for (const kiln::v1::JobLog& log : batch.logs()) {
    Job* job = graph_.FindAttempt(worker, log.job_id(), log.attempt());
    if (job == nullptr || log.lines().empty()) continue;
    JobEvent event;
    *event.mutable_log()->mutable_lines() = log.lines();
    Emit(log.job_id(), *job, std::move(event));
  }
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
    registry_.Find(admission.replaces)
        ->session->Close(absl::AbortedError("replaced by a newer connection of the same worker"));
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

void BuildCoordinator::HandleHeartbeat(WorkerEntry& worker, const kiln::v1::Heartbeat& heartbeat) {
  const std::string over = registry_.Heartbeat(worker, heartbeat, scheduler_.CapabilitiesOf(worker.name).max_jobs);
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
    case kiln::v1::RESULT_CODE_SUCCEEDED: Finish(job, kiln::v1::JOB_STATE_SUCCEEDED, result); break;
    case kiln::v1::RESULT_CODE_CANCELLED: Finish(job, kiln::v1::JOB_STATE_CANCELLED, result); break;
    case kiln::v1::RESULT_CODE_INFRA_ERROR:
      Requeue(job, "infra_error", absl::StrCat("worker ", worker.name, " could not run it: ", result.error_message()),
              /*backoff=*/true);
      break;
    default: Finish(job, kiln::v1::JOB_STATE_FAILED, result); break;
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

}  // namespace kiln
