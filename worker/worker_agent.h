// WorkerAgent: a worker's connection to the coordinator and its running jobs.
//
// It keeps one bidirectional stream open (reconnecting with exponential
// backoff and jitter), registers, heartbeats, runs each assignment through
// the BuildExecutor, and sends log lines (batched, at most every 100 ms) and
// results back.
//
// Threads: a connection loop (connect, wait, back off, heartbeat and flush
// ticks), the agent's strand (everything that touches disk or sends on the
// stream: assignments, cancels, results, log flushes — one thread, so
// messages leave in order), and the executor's own thread for build output.
//
// While the stream is down, running builds go on: the coordinator holds them
// for its lease, and the agent reports them when it registers again. Away
// longer than the lease, the agent cancels them: the coordinator has requeued
// them, and a build must not run twice at once.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/random/random.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "common/serial_executor.h"
#include "kiln/v1/workers.pb.h"
#include "worker/build_executor.h"
#include "worker/coordinator_link.h"
#include "worker/reconnect_policy.h"
#include "worker/source_cache.h"
#include "worker/worker_metrics.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace kiln {

struct WorkerOptions {
  std::string coordinator = "127.0.0.1:7600";
  std::string name;
  std::string work_dir;
  int max_jobs = 1;
  std::vector<std::string> systems;
  std::vector<std::string> supported_features;
  std::vector<std::string> mandatory_features;
  std::map<std::string, std::string> labels;
  absl::Duration min_backoff = absl::Milliseconds(200);
  absl::Duration max_backoff = absl::Seconds(10);
  absl::Duration log_flush_interval = absl::Milliseconds(100);
  // Source blobs kept in work-dir/cas after a checkout, at most; the least
  // recently used go first. 0: none kept.
  uint64_t blob_cache_bytes = uint64_t{10} << 30;
  // How to reach the coordinator (common/tls.h); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // A client token of scope `worker`, sent on every call (a coordinator with
  // --require-tokens and no TLS wants one); empty: none.
  std::string token;
  // Time for leases, heartbeats and deadlines (null: the wall clock), and
  // the seed of the reconnect jitter (0: random).
  const Clock* clock = nullptr;
  uint64_t jitter_seed = 0;
};

class WorkerAgent {
 public:
  // Talks to `options.coordinator` over gRPC. `executor` and `metrics` must
  // outlive the agent.
  WorkerAgent(WorkerOptions options, BuildExecutor* executor, WorkerMetrics* metrics);
  // Talks through `link` (which must outlive the agent; tests pass a fake).
  WorkerAgent(WorkerOptions options, CoordinatorLink* link, BuildExecutor* executor, WorkerMetrics* metrics);
  ~WorkerAgent();

  WorkerAgent(const WorkerAgent&) = delete;
  WorkerAgent& operator=(const WorkerAgent&) = delete;

  // Starts the connection loop.
  void Start();
  // Closes the stream, cancels running builds (connected or not) and waits
  // until the executor has reported every one of them, then joins.
  // Idempotent. (A broken stream alone does not cancel builds: the
  // coordinator holds them for its lease, and they are re-attached on
  // reconnect.)
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  WorkerAgent(WorkerOptions options, std::unique_ptr<CoordinatorLink> own_link, CoordinatorLink* link,
              BuildExecutor* executor, WorkerMetrics* metrics);

  struct RunningJob {
    uint32_t attempt = 0;
    BuildExecutor::BuildId build_id = 0;
    bool build_started = false;
    bool cancelled = false;
    // The whole job's deadline (its timeout), checked every tick; Nix's own
    // --timeout covers one derivation at a time.
    absl::Time deadline = absl::InfiniteFuture();
    absl::Duration timeout;
    bool timed_out = false;
    std::vector<kiln::v1::LogLine> pending_lines;
    std::string dir;
    absl::Time started;
    bool fetch_outputs = false;  // Upload the outputs to the CAS at the end.
  };

  void RunLoop();
  void OnStreamDone(const absl::Status& status) ABSL_LOCKS_EXCLUDED(mu_);

  // On the strand.
  void HandleMessage(kiln::v1::CoordinatorMessage message);
  void StartJob(const kiln::v1::Assignment& assignment);
  void FinishJob(const std::string& job_id, uint32_t attempt, kiln::v1::BuildResult result);
  // Log lines leave on SendLogs calls, apart from the control stream (see
  // worker_agent_logs.cc): one call in flight; a result goes only after the
  // lines before it were taken.
  void FlushLogs();
  void FlushLogsOnControlStream();
  void OnLogsSent(uint64_t generation, const absl::Status& status, size_t lines);
  // Sends a result now, or once the log call carrying its last lines ends.
  void SendResult(kiln::v1::WorkerMessage finished, bool lines_pending);
  void CheckDeadlines();
  void CancelAllBuilds(const std::string& reason);
  void CancelBuild(const std::string& job_id, uint32_t attempt);
  void SendHeartbeat();
  // Load, memory in use and the Nix store's free space (at registration and
  // in heartbeats, which also list the running jobs).
  void FillLoad(kiln::v1::Heartbeat& heartbeat);
  void ResendUnacked();
  // Drops a kept result: acknowledged, or no longer this worker's attempt.
  void ForgetResult(const std::string& job_id, uint32_t attempt) ABSL_LOCKS_EXCLUDED(mu_);
  bool Send(kiln::v1::WorkerMessage message, bool droppable);
  // Uploads each output of a successful build to the coordinator's CAS and
  // records its tree in `result.output_trees`.
  absl::Status UploadOutputs(kiln::v1::BuildResult& result);

  kiln::v1::WorkerMessage MakeRegister() ABSL_LOCKS_EXCLUDED(mu_);

  const WorkerOptions options_;
  std::unique_ptr<CoordinatorLink> own_link_;  // The gRPC one, unless given a link.
  CoordinatorLink* const link_;
  BuildExecutor* const executor_;
  WorkerMetrics* const metrics_;
  SourceCache sources_;  // Uses the link's CAS.
  const Clock* const clock_;
  ReconnectPolicy reconnect_;  // Used by the loop thread only.
  // Random per process (Register.instance_id): tells the coordinator a
  // reconnect of this process from another process using the same name.
  const std::string instance_id_ =
      absl::StrFormat("%016x%016x", absl::Uniform<uint64_t>(absl::BitGen()), absl::Uniform<uint64_t>(absl::BitGen()));

  absl::Mutex mu_;
  std::shared_ptr<ControlStream> stream_ ABSL_GUARDED_BY(mu_);
  bool stream_done_ ABSL_GUARDED_BY(mu_) = false;
  bool registered_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mu_) = absl::Seconds(10);
  absl::flat_hash_map<std::string, RunningJob> jobs_ ABSL_GUARDED_BY(mu_);
  // Builds handed to the executor whose result callback has not yet run
  // (it posts to the strand, which must outlive it).
  size_t builds_in_executor_ ABSL_GUARDED_BY(mu_) = 0;
  // The coordinator's lease: how long it holds our jobs while we are away.
  absl::Duration lease_ ABSL_GUARDED_BY(mu_) = absl::Seconds(60);
  // Results not yet acknowledged, by job: resent after every reconnect.
  struct UnackedResult {
    uint32_t attempt = 0;
    kiln::v1::WorkerMessage message;
  };
  absl::flat_hash_map<std::string, UnackedResult> unacked_ ABSL_GUARDED_BY(mu_);

  // Log shipping; on the strand.
  static constexpr size_t kMaxLinesPerBatch = 512;              // A job's lines that start a flush at once.
  static constexpr size_t kMaxPendingLines = 16384;             // A job's lines held while a call is in flight.
  static constexpr size_t kMaxLogBatchBytes = size_t{2} << 20;  // One call's lines, about.
  bool logs_on_control_stream_ = false;                         // The coordinator has no SendLogs.
  bool log_call_in_flight_ = false;
  uint64_t log_generation_ = 0;  // Of the last call started.
  // Last lines of finished jobs, for the next call.
  std::vector<kiln::v1::JobLog> final_logs_;
  // Results waiting for the call of a generation to end.
  std::vector<std::pair<uint64_t, kiln::v1::WorkerMessage>> deferred_results_;
  // Log calls whose callback has not finished (it posts to the strand), and
  // the one in flight (to cancel it on Stop).
  int log_calls_outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<PendingCall> log_call_ ABSL_GUARDED_BY(mu_);

  std::unique_ptr<SerialExecutor> strand_;
  std::thread loop_;
};

}  // namespace kiln
