#include "coordinator/grpc_services.h"

#include "common/handoff.h"

#include <string>
#include <utility>

#include "common/grpc_util.h"
#include "common/log.h"
#include "common/outbound_queue.h"
#include "coordinator/job_log.h"
#include "coordinator/worker_stream_session.h"

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;
using kiln::v1::JobEvent;
using kiln::v1::WorkerMessage;

// Events a watcher may lag behind by before log lines are dropped for it.
constexpr size_t kWatchQueueCapacity = 2048;

// Runs `fn` on the strand, then finishes the unary reactor with its status
// once what `fn` changed is stored (the core batches its writes).
template <typename Fn>
grpc::ServerUnaryReactor* UnaryOnStrand(grpc::CallbackServerContext* context, BuildCoordinator* core,
                                        SerialExecutor* strand, Fn fn) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  strand->Post([reactor, core, fn = std::move(fn)]() mutable {
    absl::Status status = fn();
    core->Flush();
    reactor->Finish(ToGrpcStatus(status));
  });
  return reactor;
}

// An OutboundQueue's hooks that write to, and finish, a server reactor.
template <typename Msg, typename Reactor>
typename OutboundQueue<Msg>::Hooks WriteHooks(Reactor* reactor) {
  typename OutboundQueue<Msg>::Hooks hooks;
  hooks.start_write = [reactor](const Msg* m) {
    HandOff(reactor);
    reactor->StartWrite(m);
  };
  hooks.finish = [reactor](grpc::Status s) {
    HandOff(reactor);
    reactor->Finish(std::move(s));
  };
  return hooks;
}

// The JobWatcher half of a WatchJob call; outlives the reactor if the
// coordinator still holds it.
class WatchSink final : public JobWatcher {
 public:
  explicit WatchSink(grpc::ServerWriteReactor<JobEvent>* reactor)
      : queue_(kWatchQueueCapacity, WriteHooks<JobEvent>(reactor)) {}

  // Called on the strand only.
  void OnEvent(const JobEvent& event) override {
    if (!event.has_log()) {
      queue_.Push(event, /*force=*/true);
      return;
    }
    JobEvent copy = event;
    copy.mutable_log()->set_dropped_lines(dropped_);
    if (queue_.Push(std::move(copy)) == OutboundQueue<JobEvent>::PushResult::kFull) {
      dropped_ += static_cast<uint64_t>(event.log().lines_size());
    } else {
      dropped_ = 0;
    }
  }
  void Close(absl::Status status) override { queue_.Finish(ToGrpcStatus(status)); }

  OutboundQueue<JobEvent>& queue() { return queue_; }

 private:
  OutboundQueue<JobEvent> queue_;
  uint64_t dropped_ = 0;
};

class WatchReactor final : public grpc::ServerWriteReactor<JobEvent> {
 public:
  WatchReactor(BuildCoordinator* core, SerialExecutor* strand, const kiln::v1::WatchJobRequest& request)
      : core_(core), strand_(strand), job_id_(request.job_id()), sink_(std::make_shared<WatchSink>(this)) {
    strand_->Post(
        [core, sink = sink_, id = job_id_, from = request.from_sequence(), incarnation = request.incarnation()] {
          if (absl::Status s = core->Watch(id, from, incarnation, sink); !s.ok()) sink->Close(s);
        });
    HandOff(this);  // To gRPC, which calls the reactions.
  }
  void OnWriteDone(bool ok) override {
    Reaction r(this);
    sink_->queue().OnWriteDone(ok);
  }
  void OnCancel() override {
    Reaction r(this);
    sink_->Close(absl::CancelledError("watch cancelled"));
  }
  void OnDone() override {
    TakeOver(this);
    strand_->Post([core = core_, sink = sink_, id = job_id_] { core->Unwatch(id, sink.get()); });
    delete this;
  }

 private:
  BuildCoordinator* const core_;
  SerialExecutor* const strand_;
  const std::string job_id_;
  std::shared_ptr<WatchSink> sink_;
};

class WorkerStreamReactor final : public grpc::ServerBidiReactor<WorkerMessage, CoordinatorMessage> {
 public:
  // `certificate_name`: the name in the worker's verified certificate, which
  // replaces the one it registers with ("" on plaintext).
  WorkerStreamReactor(BuildCoordinator* core, SerialExecutor* strand, SerialExecutor* sender,
                      std::string certificate_name)
      : core_(core),
        strand_(strand),
        session_(std::make_shared<WorkerStreamSession>(WriteHooks<CoordinatorMessage>(this), sender)),
        certificate_name_(std::move(certificate_name)) {
    HandOff(this);
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    Reaction r(this);
    if (!ok) {
      // The worker closed its side or the stream broke.
      session_->Close(absl::OkStatus());
      strand_->Post([core = core_, s = session_] { core->OnWorkerGone(s.get()); });
      return;
    }
    if (incoming_.has_register_() && !certificate_name_.empty() && incoming_.register_().name() != certificate_name_) {
      if (!incoming_.register_().name().empty()) {
        LogWarning("coordinator", "a worker registering as '", incoming_.register_().name(),
                   "' holds the certificate of '", certificate_name_, "': known by the certificate's name");
      }
      incoming_.mutable_register_()->set_name(certificate_name_);
    }
    strand_->Post([core = core_, s = session_, m = std::move(incoming_)] { core->OnWorkerMessage(s, m); });
    incoming_.Clear();
    HandOff(this);
    StartRead(&incoming_);
  }
  void OnWriteDone(bool ok) override {
    Reaction r(this);
    session_->queue().OnWriteDone(ok);
  }
  void OnCancel() override {
    Reaction r(this);
    session_->Close(absl::CancelledError("stream cancelled"));
  }
  void OnDone() override {
    TakeOver(this);
    strand_->Post([core = core_, s = session_] { core->OnWorkerGone(s.get()); });
    delete this;
  }

 private:
  BuildCoordinator* const core_;
  SerialExecutor* const strand_;
  std::shared_ptr<WorkerStreamSession> session_;
  const std::string certificate_name_;
  WorkerMessage incoming_;
};

// A streaming call refused before it starts.
template <typename Reactor>
class RefusedStream final : public Reactor {
 public:
  explicit RefusedStream(const absl::Status& status) {
    HandOff(this);
    this->Finish(ToGrpcStatus(status));
  }
  void OnDone() override {
    TakeOver(this);
    delete this;
  }
};

// Ends a unary call at once with `status`: a refusal, or an error found before
// the strand is needed.
grpc::ServerUnaryReactor* FinishAtOnce(grpc::CallbackServerContext* context, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

// The value of `result` into `*out`, or its error.
template <typename T>
absl::Status Into(absl::StatusOr<T> result, T* out) {
  if (!result.ok()) return result.status();
  *out = *std::move(result);
  return absl::OkStatus();
}

}  // namespace

grpc::ServerUnaryReactor* BuildServiceImpl::SubmitBuild(grpc::CallbackServerContext* context,
                                                        const kiln::v1::SubmitBuildRequest* request,
                                                        kiln::v1::SubmitBuildResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kSubmit);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  for (const auto& target : request->targets()) {
    if (!target.spec().has_push()) continue;
    if (absl::Status s = AuthorizePush(auth_, *caller, target.spec().push()); !s.ok()) return FinishAtOnce(context, s);
  }
  std::string token = caller->token.has_value() ? caller->token->name : "";
  return UnaryOnStrand(context, core_, strand_, [core = core_, request, response, token = std::move(token)] {
    return Into(core->Submit(*request, token), response);
  });
}

grpc::ServerWriteReactor<JobEvent>* BuildServiceImpl::WatchJob(grpc::CallbackServerContext* context,
                                                               const kiln::v1::WatchJobRequest* request) {
  if (absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead); !caller.ok()) {
    return new RefusedStream<grpc::ServerWriteReactor<JobEvent>>(caller.status());
  }
  return new WatchReactor(core_, strand_, *request);
}

grpc::ServerUnaryReactor* BuildServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                      const kiln::v1::CancelJobRequest* request,
                                                      kiln::v1::CancelJobResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kSubmit);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  return UnaryOnStrand(context, core_, strand_, [core = core_, request, response]() -> absl::Status {
    auto r = core->Cancel(request->job_id());
    if (!r.ok()) return r.status();
    response->set_state(*r);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BuildServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                   const kiln::v1::GetJobRequest* request, kiln::v1::Job* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  return UnaryOnStrand(context, core_, strand_,
                       [core = core_, request, response] { return Into(core->GetJob(request->job_id()), response); });
}

grpc::ServerUnaryReactor* BuildServiceImpl::GetBuildset(grpc::CallbackServerContext* context,
                                                        const kiln::v1::GetBuildsetRequest* request,
                                                        kiln::v1::Buildset* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  return UnaryOnStrand(context, core_, strand_, [core = core_, request, response] {
    return Into(core->GetBuildset(request->buildset_id()), response);
  });
}

grpc::ServerUnaryReactor* BuildServiceImpl::CancelBuildset(grpc::CallbackServerContext* context,
                                                           const kiln::v1::CancelBuildsetRequest* request,
                                                           kiln::v1::Buildset* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kSubmit);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  return UnaryOnStrand(context, core_, strand_, [core = core_, request, response] {
    return Into(core->CancelBuildset(request->buildset_id()), response);
  });
}

grpc::ServerUnaryReactor* BuildServiceImpl::GetJobLog(grpc::CallbackServerContext* context,
                                                      const kiln::v1::GetJobLogRequest* request,
                                                      kiln::v1::GetJobLogResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  // A finished job's log is read from the store on the reader thread: a
  // point read and a decompression stay off the strand, and off gRPC's own
  // reaction threads, which must not block.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto read = [reactor, core = core_, strand = strand_, store = store_, request, response]() mutable {
    bool have_stored = false;
    if (store != nullptr) {
      absl::StatusOr<std::string> bytes = store->GetLog(request->job_id());
      absl::Status failed;
      if (bytes.ok()) {
        absl::StatusOr<kiln::state::v1::StoredLog> log = DecodeStoredLog(*bytes);
        if (log.ok()) {
          response->mutable_lines()->Swap(log->mutable_lines());
          response->set_dropped_lines(log->dropped_lines());
          have_stored = true;
        } else {
          failed = log.status();
        }
      } else if (!absl::IsNotFound(bytes.status())) {
        failed = bytes.status();
      }
      if (!failed.ok()) {
        reactor->Finish(ToGrpcStatus(absl::Status(
            failed.code(), absl::StrCat("read the stored log of job ", request->job_id(), ": ", failed.message()))));
        return;
      }
    }
    strand->Post([reactor, core, request, response, have_stored] {
      absl::Status status = core->GetJobLog(request->job_id(), have_stored, response);
      core->Flush();
      reactor->Finish(ToGrpcStatus(status));
    });
  };
  if (reader_ != nullptr) {
    reader_->Post(std::move(read));
  } else {
    read();
  }
  return reactor;
}

grpc::ServerUnaryReactor* BuildServiceImpl::ListBuildsets(grpc::CallbackServerContext* context,
                                                          const kiln::v1::ListBuildsetsRequest* request,
                                                          kiln::v1::ListBuildsetsResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  const size_t limit = request->limit() == 0 ? 20 : std::min<size_t>(request->limit(), 1000);
  return UnaryOnStrand(context, core_, strand_, [core = core_, response, limit] {
    *response = core->ListBuildsets(limit);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FarmServiceImpl::ListWorkers(grpc::CallbackServerContext* context,
                                                       const kiln::v1::ListWorkersRequest* request,
                                                       kiln::v1::ListWorkersResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  return UnaryOnStrand(context, core_, strand_, [core = core_, response]() -> absl::Status {
    *response = core->ListWorkers();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* FarmServiceImpl::DrainWorker(grpc::CallbackServerContext* context,
                                                       const kiln::v1::DrainWorkerRequest* request,
                                                       kiln::v1::DrainWorkerResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  return UnaryOnStrand(context, core_, strand_, [core = core_, request, response] {
    return Into(core->DrainWorker(request->name(), request->undo()), response->mutable_worker());
  });
}

grpc::ServerBidiReactor<WorkerMessage, CoordinatorMessage>* WorkerServiceImpl::Connect(
    grpc::CallbackServerContext* context) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kWorker);
  if (!caller.ok()) {
    LogWarning("coordinator", "refused a worker stream from ", context->peer(), ": ", caller.status().message());
    return new RefusedStream<grpc::ServerBidiReactor<WorkerMessage, CoordinatorMessage>>(caller.status());
  }
  return new WorkerStreamReactor(core_, strand_, sender_, caller->worker);
}

grpc::ServerUnaryReactor* WorkerServiceImpl::SendLogs(grpc::CallbackServerContext* context,
                                                      const kiln::v1::LogBatch* request,
                                                      kiln::v1::LogBatchAck* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kWorker);
  if (!caller.ok()) return FinishAtOnce(context, caller.status());
  // A certificate's name, as on Connect; else the name the worker gives.
  std::string worker = caller->worker.empty() ? request->worker() : caller->worker;
  return UnaryOnStrand(context, core_, strand_, [core = core_, request, worker = std::move(worker)] {
    core->OnWorkerLogs(worker, *request);
    return absl::OkStatus();
  });
}

}  // namespace kiln
