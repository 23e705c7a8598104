#include "worker/worker_agent.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <system_error>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "common/handoff.h"
#include "common/grpc_util.h"
#include "common/cas_client.h"
#include "common/log.h"
#include "common/net.h"
#include "common/outbound_queue.h"
#include "common/source_tree.h"
#include "common/status_macros.h"

namespace kiln {
namespace fs = std::filesystem;

using kiln::v1::CoordinatorMessage;
using kiln::v1::WorkerMessage;

namespace {
constexpr absl::string_view kComponent = "worker";
constexpr absl::Duration kDeadlineGrace = absl::Seconds(5);
// 1 - MemAvailable/MemTotal from /proc/meminfo; nullopt where it is absent.
std::optional<double> MemoryUsedFraction() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  double value = 0, total = 0, available = -1;
  std::string unit;
  while (in >> key >> value) {
    std::getline(in, unit);
    if (key == "MemTotal:") total = value;
    if (key == "MemAvailable:") available = value;
  }
  if (total <= 0 || available < 0) return std::nullopt;
  return 1.0 - available / total;
}

}  // namespace

WorkerAgent::WorkerAgent(WorkerOptions options, BuildExecutor* executor, WorkerMetrics* metrics)
    : WorkerAgent(
          options,
          std::make_unique<GrpcCoordinatorLink>(MakeChannel(options.coordinator, options.credentials, options.token)),
          nullptr, executor, metrics) {}

WorkerAgent::WorkerAgent(WorkerOptions options, CoordinatorLink* link, BuildExecutor* executor, WorkerMetrics* metrics)
    : WorkerAgent(std::move(options), nullptr, link, executor, metrics) {}

WorkerAgent::WorkerAgent(WorkerOptions options, std::unique_ptr<CoordinatorLink> own_link, CoordinatorLink* link,
                         BuildExecutor* executor, WorkerMetrics* metrics)
    : options_(std::move(options)),
      own_link_(std::move(own_link)),
      link_(own_link_ != nullptr ? own_link_.get() : link),
      executor_(executor),
      metrics_(metrics),
      sources_(options_.work_dir, options_.blob_cache_bytes, link_->cas()),
      clock_(options_.clock != nullptr ? options_.clock : RealClock::Get()),
      reconnect_(clock_, options_.min_backoff, options_.max_backoff, options_.jitter_seed),
      strand_(std::make_unique<SerialExecutor>("worker")) {
  metrics_->slots.Set(options_.max_jobs);
}

WorkerAgent::~WorkerAgent() { Stop(); }

void WorkerAgent::Start() {
  loop_ = std::thread([this] { RunLoop(); });
}

void WorkerAgent::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (loop_.joinable()) loop_.join();
  // Connected or not, the builds stop with the worker (a stopping worker
  // cannot report them). Posted after the loop ended, so it follows every
  // assignment the stream delivered: none starts after it.
  // Waited for: a job the strand was starting when the stop began (its
  // checkout under way) reaches the executor before the cancel, and is
  // counted below; counting before the strand got there once let Stop()
  // free the strand under that build's last callback.
  absl::Notification cancelled;
  strand_->Post([this, &cancelled] {
    CancelAllBuilds("the worker is stopping");
    cancelled.Notify();
  });
  cancelled.WaitForNotification();
  // Every build's last callback posts to the strand: the strand stays until
  // the executor has made it, however long the build takes to stop (the
  // executor escalates to SIGKILL; a service manager's stop timeout bounds
  // the rest).
  {
    absl::MutexLock lock(&mu_);
    const auto all_ended =
        +[](WorkerAgent* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(a->mu_) { return a->builds_in_executor_ == 0; };
    while (!mu_.AwaitWithTimeout(absl::Condition(all_ended, this), absl::Seconds(10))) {
      LogWarning(kComponent, "stopping: waiting for ", builds_in_executor_, " build(s) to end");
    }
    // A log call's callback posts to the strand: it goes first. No call
    // starts any more (FlushLogs sees stopping_).
    if (log_call_ != nullptr) log_call_->Cancel();
    mu_.Await(absl::Condition(
        +[](WorkerAgent* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(a->mu_) { return a->log_calls_outstanding_ == 0; }, this));
  }
  strand_.reset();
}

WorkerMessage WorkerAgent::MakeRegister() {
  WorkerMessage message;
  auto* reg = message.mutable_register_();
  reg->set_name(options_.name);
  reg->set_instance_id(instance_id_);
  for (const auto& s : options_.systems) reg->add_systems(s);
  for (const auto& f : options_.supported_features) reg->add_supported_features(f);
  for (const auto& f : options_.mandatory_features) reg->add_mandatory_features(f);
  reg->set_max_jobs(static_cast<uint32_t>(options_.max_jobs));
  reg->set_speed_factor(1.0);
  for (const auto& [k, v] : options_.labels) (*reg->mutable_labels())[k] = v;
  reg->set_version("0.1.0");
  FillLoad(*reg->mutable_initial_load());
  absl::MutexLock lock(&mu_);
  for (const auto& [id, job] : jobs_) {
    auto* running = reg->add_running();
    running->set_job_id(id);
    running->set_attempt(job.attempt);
  }
  for (const auto& [id, result] : unacked_) {
    auto* running = reg->add_running();
    running->set_job_id(id);
    running->set_attempt(result.attempt);
  }
  return message;
}

void WorkerAgent::RunLoop() {
  bool first = true;
  for (;;) {
    if (!first) metrics_->reconnects.Increment();
    first = false;
    {
      // Away longer than the lease: the coordinator has requeued our jobs.
      absl::Duration lease;
      {
        absl::MutexLock lock(&mu_);
        lease = lease_;
      }
      if (reconnect_.LeaseLapsed(lease)) {
        strand_->Post([this, lease] {
          CancelAllBuilds(absl::StrCat("the coordinator was unreachable for longer than its lease (",
                                       absl::FormatDuration(lease), ") and has requeued them"));
        });
      }
    }
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) break;
      stream_done_ = false;
    }
    ControlStreamHandlers handlers;
    handlers.on_message = [this](CoordinatorMessage m) {
      strand_->Post([this, m = std::move(m)]() mutable { HandleMessage(std::move(m)); });
    };
    handlers.on_done = [this](absl::Status status) { OnStreamDone(status); };
    // This loop holds the stream until it has seen it end: it is destroyed
    // here, on a thread Stop() joins.
    std::shared_ptr<ControlStream> stream = link_->Connect(MakeRegister(), std::move(handlers));
    {
      // Published only once the call is bound: the strand's sends
      // (FlushLogs, heartbeats) start writes on it, and before the bind the
      // reactor has no call to write on (ASan caught one doing so).
      absl::MutexLock lock(&mu_);
      stream_ = stream;
    }

    absl::Time next_heartbeat = clock_->Now();
    bool was_registered = false;
    for (;;) {
      bool done, stopping, registered;
      absl::Duration heartbeat_interval;
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(
            absl::Condition(
                +[](WorkerAgent* a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(a->mu_) { return a->stream_done_ || a->stopping_; },
                this),
            options_.log_flush_interval);
        done = stream_done_;
        stopping = stopping_;
        registered = registered_;
        heartbeat_interval = heartbeat_interval_;
      }
      if (done) break;
      if (stopping) {
        stream->Cancel();
        continue;  // Wait for OnDone.
      }
      was_registered |= registered;
      strand_->Post([this] {
        FlushLogs();
        CheckDeadlines();
      });
      if (registered && clock_->Now() >= next_heartbeat) {
        next_heartbeat = clock_->Now() + heartbeat_interval;
        strand_->Post([this] { SendHeartbeat(); });
      }
    }
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      // Registered since the last tick counts too: a stream that broke just
      // after registering leaves builds for the lease rule.
      was_registered |= registered_;
      stream_.reset();
      registered_ = false;
      stopping = stopping_;
    }
    metrics_->coordinator_connected.Set(0);
    if (stopping) break;  // Stop() cancels the builds.
    if (was_registered) reconnect_.Lost();
    const absl::Duration wait = reconnect_.NextWait(was_registered);
    LogInfo(kComponent, "not connected to ", options_.coordinator, "; retrying in ", absl::FormatDuration(wait));
    absl::MutexLock lock(&mu_);
    mu_.AwaitWithTimeout(absl::Condition(&stopping_), wait);
    if (stopping_) break;
  }
}

void WorkerAgent::OnStreamDone(const absl::Status& status) {
  if (!status.ok()) LogWarning(kComponent, "stream to the coordinator ended: ", status.ToString());
  absl::MutexLock lock(&mu_);
  stream_done_ = true;
}

bool WorkerAgent::Send(WorkerMessage message, bool droppable) {
  std::shared_ptr<ControlStream> stream;
  {
    absl::MutexLock lock(&mu_);
    stream = stream_;
  }
  if (!stream) return false;
  return stream->Send(std::move(message), droppable);
}

void WorkerAgent::HandleMessage(CoordinatorMessage message) {
  for (const auto& ack : message.acks()) ForgetResult(ack.job_id(), ack.attempt());
  switch (message.kind_case()) {
    case CoordinatorMessage::kRegistered: {
      {
        absl::MutexLock lock(&mu_);
        registered_ = true;
        absl::Duration d = FromProtoDuration(message.registered().heartbeat_interval());
        if (d > absl::ZeroDuration()) heartbeat_interval_ = d;
        if (message.registered().has_lease()) lease_ = FromProtoDuration(message.registered().lease());
      }
      metrics_->coordinator_connected.Set(1);
      LogInfo(kComponent, "registered with ", options_.coordinator, " as ", options_.name);
      ResendUnacked();
      break;
    }
    case CoordinatorMessage::kResultAck:
      ForgetResult(message.result_ack().job_id(), message.result_ack().attempt());
      break;
    case CoordinatorMessage::kAssign: StartJob(message.assign()); break;
    case CoordinatorMessage::kCancel:
      LogInfo(ForJob(message.cancel().job_id()), kComponent, "cancel (", message.cancel().reason(), ")");
      ForgetResult(message.cancel().job_id(), message.cancel().attempt());  // Not wanted any more.
      CancelBuild(message.cancel().job_id(), message.cancel().attempt());
      break;
    case CoordinatorMessage::KIND_NOT_SET: break;
  }
  for (const auto& assignment : message.assignments()) StartJob(assignment);
}

absl::Status WorkerAgent::UploadOutputs(kiln::v1::BuildResult& result) {
  SourceTreeLimits limits;
  limits.max_total_bytes = uint64_t{64} << 30;
  limits.max_entries = uint64_t{1} << 24;
  limits.max_entries_per_directory = uint64_t{1} << 20;
  limits.max_depth = 256;
  for (const auto& [name, path] : result.outputs()) {
    // A tree whose root holds one entry, "out": the output as it is.
    SourceTree tree;
    kiln::v1::Directory wrapper;
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) return absl::NotFoundError(absl::StrCat("output ", path, " is missing"));
    if (S_ISDIR(st.st_mode)) {
      absl::StatusOr<SourceTree> built = BuildSourceTree(path, limits, {.keep_file_data = false});
      if (!built.ok()) return built.status();
      tree = *std::move(built);
      auto* node = wrapper.add_directories();
      node->set_name("out");
      *node->mutable_digest() = tree.root;
    } else if (S_ISLNK(st.st_mode)) {
      std::error_code ec;
      auto* node = wrapper.add_symlinks();
      node->set_name("out");
      node->set_target(fs::read_symlink(path, ec).string());
    } else {
      std::string data;
      RETURN_IF_ERROR(ReadWholeFile(path, data));
      auto* node = wrapper.add_files();
      node->set_name("out");
      node->set_is_executable((st.st_mode & 0111) != 0);
      *node->mutable_digest() = DigestOf(data);
      tree.blobs.emplace(node->digest().hash(), std::move(data));
    }
    const std::string wrapper_blob = SerializeDirectory(wrapper);
    tree.root = DigestOf(wrapper_blob);
    tree.blobs.emplace(tree.root.hash(), wrapper_blob);
    UploadStats stats;
    if (link_->cas() == nullptr) return absl::FailedPreconditionError("no CAS to upload outputs to");
    RETURN_IF_ERROR(UploadTree(*link_->cas(), tree, &stats));
    (*result.mutable_output_trees())[name] = tree.root;
    LogInfo(kComponent, "output ", name, ": sent ", stats.blobs_sent, " blob(s), ", stats.bytes_sent, " bytes");
  }
  return absl::OkStatus();
}

void WorkerAgent::StartJob(const kiln::v1::Assignment& assignment) {
  const std::string job_id = assignment.job_id();
  const uint32_t attempt = assignment.attempt();
  const fs::path dir = fs::path(options_.work_dir) / "builds" / absl::StrCat(job_id, "-", attempt);
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ || jobs_.contains(job_id)) return;
    RunningJob& job = jobs_[job_id];
    job.attempt = attempt;
    job.dir = dir.string();
    job.started = clock_->Now();
    job.fetch_outputs = assignment.spec().fetch_outputs();
    if (assignment.spec().has_timeout() && assignment.spec().timeout().seconds() > 0) {
      job.timeout = FromProtoDuration(assignment.spec().timeout());
      // A little later than Nix's per-derivation timeout, whose message is
      // more precise when one derivation is the culprit.
      job.deadline = job.started + job.timeout + kDeadlineGrace;
    }
  }
  metrics_->builds_running.Increment();
  LogInfo(ForJob(job_id, attempt), kComponent, assignment.spec().display_name());

  auto fail = [&](kiln::v1::ResultCode code, std::string message) {
    kiln::v1::BuildResult result;
    result.set_code(code);
    result.set_error_message(std::move(message));
    FinishJob(job_id, attempt, std::move(result));
  };
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir / "src", ec);
  if (ec)
    return fail(kiln::v1::RESULT_CODE_INFRA_ERROR, absl::StrCat("cannot create ", dir.string(), ": ", ec.message()));
  if (absl::Status s = sources_.CheckOut(assignment, (dir / "src").string()); !s.ok()) {
    fs::remove_all(dir, ec);  // What was checked out of it.
    return fail(kiln::v1::RESULT_CODE_INFRA_ERROR, absl::StrCat("cannot check out the source: ", s.message()));
  }
  const fs::path flake_dir = dir / "src";  // CheckOut wrote the flake's directory there.
  // A derivation job (JobSpec.derivation) has an empty tree: no flake.
  if (!assignment.spec().has_derivation() && !fs::exists(flake_dir / "flake.nix")) {
    return fail(kiln::v1::RESULT_CODE_BUILD_FAILED,
                absl::StrCat("error: no flake.nix in '", assignment.spec().source().flake_subdir(), "'"));
  }

  WorkerMessage started;
  started.mutable_started()->set_job_id(job_id);
  started.mutable_started()->set_attempt(attempt);
  Send(std::move(started), /*droppable=*/false);

  BuildRequest request;
  request.flake_dir = flake_dir.string();
  request.attr = assignment.spec().attr();
  request.spec = assignment.spec();
  request.job_id = job_id;
  auto on_line = [this, job_id, attempt](kiln::v1::LogLine line) {
    bool flush_now = false;
    {
      absl::MutexLock lock(&mu_);
      auto it = jobs_.find(job_id);
      if (it == jobs_.end() || it->second.attempt != attempt) return;
      // Bounded while a log call is in flight: past the cap, lines of a
      // chatty build are dropped (and counted) rather than held.
      if (it->second.pending_lines.size() >= kMaxPendingLines) {
        metrics_->log_lines_dropped.Increment();
        return;
      }
      it->second.pending_lines.push_back(std::move(line));
      flush_now = it->second.pending_lines.size() == kMaxLinesPerBatch;
    }
    if (flush_now) strand_->Post([this] { FlushLogs(); });
  };
  auto on_done = [this, job_id, attempt](kiln::v1::BuildResult result) {
    strand_->Post([this, job_id, attempt, result = std::move(result)]() mutable {
      FinishJob(job_id, attempt, std::move(result));
    });
    // The executor's last touch of this agent: Stop() may now take the strand down.
    absl::MutexLock lock(&mu_);
    --builds_in_executor_;
  };
  {
    absl::MutexLock lock(&mu_);
    ++builds_in_executor_;
  }
  absl::StatusOr<BuildExecutor::BuildId> id = executor_->Start(request, std::move(on_line), std::move(on_done));
  if (!id.ok()) {
    {
      absl::MutexLock lock(&mu_);
      --builds_in_executor_;
    }
    return fail(kiln::v1::RESULT_CODE_INFRA_ERROR, absl::StrCat("cannot start nix: ", id.status().message()));
  }
  bool cancel_now = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it != jobs_.end()) {
      it->second.build_id = *id;
      it->second.build_started = true;
      cancel_now = it->second.cancelled;
    }
  }
  if (cancel_now) executor_->Cancel(*id);
}

void WorkerAgent::FinishJob(const std::string& job_id, uint32_t attempt, kiln::v1::BuildResult result) {
  FlushLogs();  // Lines before the result.
  RunningJob job;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || it->second.attempt != attempt) return;
    job = std::move(it->second);
    jobs_.erase(it);
  }
  if (job.timed_out) {
    result.set_code(kiln::v1::RESULT_CODE_TIMED_OUT);
    result.set_error_message(
        absl::StrCat("the job ran longer than its timeout of ", absl::FormatDuration(job.timeout)));
  }
  if (job.fetch_outputs && result.code() == kiln::v1::RESULT_CODE_SUCCEEDED) {
    if (absl::Status s = UploadOutputs(result); !s.ok()) {
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(absl::StrCat("the build succeeded but its outputs could not be sent: ", s.message()));
    }
  }
  metrics_->builds_running.Decrement();
  metrics_->build_duration.Observe(absl::ToDoubleSeconds(clock_->Now() - job.started));
  absl::string_view label = "failed";
  switch (result.code()) {
    case kiln::v1::RESULT_CODE_SUCCEEDED: label = "succeeded"; break;
    case kiln::v1::RESULT_CODE_CANCELLED: label = "cancelled"; break;
    case kiln::v1::RESULT_CODE_INFRA_ERROR: label = "infra_error"; break;
    case kiln::v1::RESULT_CODE_TIMED_OUT: label = "timed_out"; break;
    default: break;
  }
  metrics_->BuildsFinished(label).Increment();
  if (result.code() == kiln::v1::RESULT_CODE_SUCCEEDED || result.error_message().empty()) {
    LogInfo(ForJob(job_id, attempt), kComponent, label);
  } else {
    // Why, in the worker's own log too (its first line): the job's log may
    // be gone when someone reads this one.
    const std::string& e = result.error_message();
    LogInfo(ForJob(job_id, attempt), kComponent, label, ": ",
            absl::string_view(e).substr(0, std::min(e.find('\n'), size_t{300})));
  }

  WorkerMessage finished;
  finished.mutable_finished()->set_job_id(job_id);
  finished.mutable_finished()->set_attempt(attempt);
  *finished.mutable_finished()->mutable_result() = std::move(result);
  {
    // Kept until acknowledged: a stream can break with the result in flight.
    absl::MutexLock lock(&mu_);
    unacked_[job_id] = UnackedResult{.attempt = attempt, .message = finished};
  }
  // Its last lines, if a log call was in flight, go with the next one.
  const bool lines_pending = !job.pending_lines.empty();
  if (lines_pending) {
    kiln::v1::JobLog& last = final_logs_.emplace_back();
    last.set_job_id(job_id);
    last.set_attempt(attempt);
    for (auto& line : job.pending_lines) *last.add_lines() = std::move(line);
  }
  SendResult(std::move(finished), lines_pending);
  // Nix copied the source into its store; the unpacked tree is not needed.
  std::error_code ec;
  fs::remove_all(job.dir, ec);
}

void WorkerAgent::CancelBuild(const std::string& job_id, uint32_t attempt) {
  BuildExecutor::BuildId id = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end() || it->second.attempt != attempt) return;
    it->second.cancelled = true;
    if (!it->second.build_started) return;  // StartJob cancels once started.
    id = it->second.build_id;
  }
  executor_->Cancel(id);
}

void WorkerAgent::CheckDeadlines() {
  std::vector<std::pair<std::string, uint32_t>> late;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    for (auto& [id, job] : jobs_) {
      if (job.timed_out || now < job.deadline) continue;
      job.timed_out = true;
      late.emplace_back(id, job.attempt);
    }
  }
  for (const auto& [id, attempt] : late) {
    LogWarning(ForJob(id, attempt), kComponent, "timed out; stopping it");
    CancelBuild(id, attempt);
  }
}

void WorkerAgent::CancelAllBuilds(const std::string& reason) {
  std::vector<std::pair<std::string, uint32_t>> running;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, job] : jobs_) running.emplace_back(id, job.attempt);
  }
  if (!running.empty()) LogWarning(kComponent, "cancelling ", running.size(), " build(s): ", reason);
  for (const auto& [id, attempt] : running) CancelBuild(id, attempt);
}

void WorkerAgent::ForgetResult(const std::string& job_id, uint32_t attempt) {
  absl::MutexLock lock(&mu_);
  auto it = unacked_.find(job_id);
  if (it != unacked_.end() && it->second.attempt == attempt) unacked_.erase(it);
}

void WorkerAgent::ResendUnacked() {
  std::vector<WorkerMessage> results;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [_, r] : unacked_) results.push_back(r.message);
  }
  for (auto& m : results) Send(std::move(m), /*droppable=*/false);
}

void WorkerAgent::SendHeartbeat() {
  WorkerMessage message;
  FillLoad(*message.mutable_heartbeat());
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, job] : jobs_) {
      auto* r = message.mutable_heartbeat()->add_running();
      r->set_job_id(id);
      r->set_attempt(job.attempt);
    }
  }
  Send(std::move(message), /*droppable=*/true);
}

void WorkerAgent::FillLoad(kiln::v1::Heartbeat& heartbeat) {
  double load[1] = {0};
  if (getloadavg(load, 1) == 1) heartbeat.set_load_average(load[0]);
  // Free space where the builds' outputs land: the Nix store's file system.
  std::error_code ec;
  auto space = fs::space(fs::exists("/nix/store", ec) ? "/nix/store" : options_.work_dir, ec);
  if (!ec) {
    heartbeat.set_store_free_bytes(static_cast<int64_t>(space.available));
    metrics_->store_free_bytes.Set(static_cast<double>(space.available));
    metrics_->store_size_bytes.Set(static_cast<double>(space.capacity));
  }
  if (auto work = fs::space(options_.work_dir, ec); !ec) {
    heartbeat.set_work_dir_free_bytes(static_cast<int64_t>(work.available));
    metrics_->work_dir_free_bytes.Set(static_cast<double>(work.available));
  }
  if (std::optional<double> used = MemoryUsedFraction()) heartbeat.set_memory_used_fraction(*used);
}

}  // namespace kiln
