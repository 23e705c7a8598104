// WorkerAgent, its log shipping: build log lines leave on SendLogs calls,
// apart from the control stream (Connect), so a build writing megabytes of
// log cannot delay a cancel, an assignment or an acknowledgement.
//
// One call is in flight at a time, which keeps each job's lines in order;
// lines that arrive meanwhile wait (at most kMaxPendingLines per job, the
// rest dropped and counted) and go with the next call, which starts when
// the last one ends. A job's result goes on the control stream only after
// the call carrying its last lines has ended, so the coordinator has every
// line before the job finishes there. Against a coordinator without
// SendLogs (UNIMPLEMENTED), lines go on the control stream as before.
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "worker/worker_agent.h"

namespace kiln {

using kiln::v1::WorkerMessage;

void WorkerAgent::FlushLogs() {
  if (logs_on_control_stream_) return FlushLogsOnControlStream();
  if (log_call_in_flight_) return;  // OnLogsSent flushes again.
  kiln::v1::LogBatch batch;
  bool send = true;
  batch.set_worker(options_.name);
  size_t lines = 0, bytes = 0;
  // Finished jobs' last lines first: nothing of theirs is newer.
  for (kiln::v1::JobLog& log : final_logs_) {
    lines += static_cast<size_t>(log.lines_size());
    bytes += log.ByteSizeLong();
    *batch.add_logs() = std::move(log);
  }
  final_logs_.clear();
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, job] : jobs_) {
      if (job.pending_lines.empty() || bytes >= kMaxLogBatchBytes) continue;
      kiln::v1::JobLog* log = batch.add_logs();
      log->set_job_id(id);
      log->set_attempt(job.attempt);
      size_t taken = 0;
      for (; taken < job.pending_lines.size() && bytes < kMaxLogBatchBytes; ++taken) {
        bytes += job.pending_lines[taken].ByteSizeLong();
        *log->add_lines() = std::move(job.pending_lines[taken]);
      }
      lines += taken;
      job.pending_lines.erase(job.pending_lines.begin(), job.pending_lines.begin() + static_cast<ptrdiff_t>(taken));
    }
    if (batch.logs().empty()) {
      send = false;  // Nothing to send.
    } else if (stopping_) {
      // The stream is closing: nobody would read these.
      metrics_->log_lines_dropped.Increment(static_cast<double>(lines));
      send = false;
    } else {
      ++log_calls_outstanding_;
    }
  }
  // Nothing went: results waiting on earlier calls may go.
  if (!send) return OnLogsSent(++log_generation_, absl::OkStatus(), 0);
  const uint64_t generation = ++log_generation_;
  log_call_in_flight_ = true;
  // Held while it runs, to cancel it on Stop. Its callback may run before
  // SendLogs returns (`finished` says so): then there is nothing to hold.
  auto finished = std::make_shared<bool>(false);
  std::shared_ptr<PendingCall> pending =
      link_->SendLogs(std::move(batch), [this, generation, lines, finished](absl::Status status) {
        strand_->Post([this, generation, lines, status] { OnLogsSent(generation, status, lines); });
        // Last touch of the agent: Stop() may now take the strand down.
        absl::MutexLock lock(&mu_);
        *finished = true;
        log_call_.reset();
        --log_calls_outstanding_;
      });
  absl::MutexLock lock(&mu_);
  if (!*finished) log_call_ = std::move(pending);
}

void WorkerAgent::OnLogsSent(uint64_t generation, const absl::Status& status, size_t lines) {
  if (generation == log_generation_) log_call_in_flight_ = false;
  if (!status.ok()) {
    if (absl::IsUnimplemented(status) && !logs_on_control_stream_) {
      LogInfo("worker", "the coordinator has no log call; sending log lines on the control stream");
      logs_on_control_stream_ = true;
    }
    metrics_->log_lines_dropped.Increment(static_cast<double>(lines));
  }
  // The results whose last lines went with this call or before, in order.
  std::vector<WorkerMessage> ready;
  auto keep = deferred_results_.begin();
  for (auto& [wait_for, message] : deferred_results_) {
    if (wait_for <= generation || logs_on_control_stream_) {
      ready.push_back(std::move(message));
    } else {
      *keep++ = {wait_for, std::move(message)};
    }
  }
  deferred_results_.erase(keep, deferred_results_.end());
  if (logs_on_control_stream_) FlushLogsOnControlStream();  // Lines before results, on one stream.
  for (WorkerMessage& m : ready) Send(std::move(m), /*droppable=*/false);
  // After a failure, the next tick tries again (no busy loop while the
  // coordinator is away).
  if (status.ok() && !log_call_in_flight_ && (!final_logs_.empty() || lines > 0)) FlushLogs();
}

void WorkerAgent::SendResult(WorkerMessage finished, bool lines_pending) {
  // Its lines went with the call in flight, or wait for the next one.
  const uint64_t wait_for = lines_pending ? log_generation_ + 1 : log_call_in_flight_ ? log_generation_ : 0;
  if (wait_for == 0 || logs_on_control_stream_) {
    if (logs_on_control_stream_) FlushLogsOnControlStream();
    Send(std::move(finished), /*droppable=*/false);
    return;
  }
  deferred_results_.emplace_back(wait_for, std::move(finished));
  if (!log_call_in_flight_) FlushLogs();
}

void WorkerAgent::FlushLogsOnControlStream() {
  std::vector<WorkerMessage> batches;
  for (kiln::v1::JobLog& log : final_logs_) {
    WorkerMessage m;
    *m.mutable_log() = std::move(log);
    batches.push_back(std::move(m));
  }
  final_logs_.clear();
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, job] : jobs_) {
      if (job.pending_lines.empty()) continue;
      WorkerMessage m;
      m.mutable_log()->set_job_id(id);
      m.mutable_log()->set_attempt(job.attempt);
      for (auto& line : job.pending_lines) *m.mutable_log()->add_lines() = std::move(line);
      job.pending_lines.clear();
      batches.push_back(std::move(m));
    }
  }
  for (auto& m : batches) {
    const size_t lines = static_cast<size_t>(m.log().lines_size());
    if (!Send(std::move(m), /*droppable=*/true)) metrics_->log_lines_dropped.Increment(static_cast<double>(lines));
  }
}

}  // namespace kiln
