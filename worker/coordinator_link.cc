#include "worker/coordinator_link.h"

#include <chrono>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "common/grpc_util.h"
#include "common/handoff.h"
#include "common/outbound_queue.h"
#include "kiln/v1/workers.grpc.pb.h"

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;
using kiln::v1::WorkerMessage;

// Log batches beyond this many queued messages are dropped (and counted)
// rather than let a chatty build grow memory without bound.
constexpr size_t kStreamQueueCapacity = 4096;
constexpr auto kLogCallDeadline = std::chrono::seconds(30);

}  // namespace

// One stream. Owned by a shared_ptr that it holds on itself until OnDone,
// so gRPC never calls into a destroyed reactor; whoever connected it holds
// it past OnDone, so it (its ClientContext and call) is destroyed on their
// thread, not on gRPC's, where it could outlive its owner and the channel.
class GrpcCoordinatorLink::Stream final : public ControlStream,
                                          public grpc::ClientBidiReactor<WorkerMessage, CoordinatorMessage> {
 public:
  static std::shared_ptr<Stream> Create(ControlStreamHandlers handlers) {
    auto s = std::shared_ptr<Stream>(new Stream(std::move(handlers)));
    s->self_ = s;
    return s;
  }

  void Begin(kiln::v1::WorkerService::Stub& stub, WorkerMessage first) {
    stub.async()->Connect(&context_, this);
    // Writes come from the caller's threads, outside reactions: hold the
    // call open until the queue is finished.
    AddHold();
    HandOff(this);
    queue_.Push(std::move(first), /*force=*/true);
    StartRead(&incoming_);
    StartCall();
  }

  bool Send(WorkerMessage message, bool droppable) override {
    return queue_.Push(std::move(message), /*force=*/!droppable) == OutboundQueue<WorkerMessage>::PushResult::kQueued;
  }

  void Cancel() override { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    Reaction r(this);
    if (!ok) {
      queue_.Finish(grpc::Status::OK);
      return;
    }
    handlers_.on_message(std::move(incoming_));
    incoming_.Clear();
    HandOff(this);
    StartRead(&incoming_);
  }
  void OnWriteDone(bool ok) override {
    Reaction r(this);
    queue_.OnWriteDone(ok);
  }
  void OnDone(const grpc::Status& status) override {
    TakeOver(this);
    auto on_done = std::move(handlers_.on_done);
    self_.reset();
    on_done(FromGrpcStatus(status));  // Last: `this` may be gone once it returns.
  }

 private:
  explicit Stream(ControlStreamHandlers handlers)
      : handlers_(std::move(handlers)),
        queue_(kStreamQueueCapacity, {.start_write =
                                          [this](const WorkerMessage* m) {
                                            HandOff(this);
                                            StartWrite(m);
                                          },
                                      .finish =
                                          [this](grpc::Status) {
                                            HandOff(this);
                                            StartWritesDone();
                                            RemoveHold();
                                          }}) {}

  ControlStreamHandlers handlers_;
  grpc::ClientContext context_;
  OutboundQueue<WorkerMessage> queue_;
  CoordinatorMessage incoming_;
  std::shared_ptr<Stream> self_;
};

struct GrpcCoordinatorLink::LogCall final : PendingCall {
  void Cancel() override { context.TryCancel(); }
  grpc::ClientContext context;
  kiln::v1::LogBatch request;
  kiln::v1::LogBatchAck response;
  absl::AnyInvocable<void(absl::Status)> done;
};

GrpcCoordinatorLink::GrpcCoordinatorLink(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)),
      stub_(kiln::v1::WorkerService::NewStub(channel_)),
      cas_(kiln::v1::CasService::NewStub(channel_)) {}

GrpcCoordinatorLink::~GrpcCoordinatorLink() = default;

std::shared_ptr<ControlStream> GrpcCoordinatorLink::Connect(WorkerMessage first, ControlStreamHandlers handlers) {
  std::shared_ptr<Stream> stream = Stream::Create(std::move(handlers));
  stream->Begin(*stub_, std::move(first));
  return stream;
}

std::shared_ptr<PendingCall> GrpcCoordinatorLink::SendLogs(kiln::v1::LogBatch batch,
                                                           absl::AnyInvocable<void(absl::Status)> done) {
  auto call = std::make_shared<LogCall>();
  call->request = std::move(batch);
  call->done = std::move(done);
  call->context.set_deadline(std::chrono::system_clock::now() + kLogCallDeadline);
  // The callback holds the call (its context, request and response) until
  // it has run; the caller's reference only cancels.
  stub_->async()->SendLogs(&call->context, &call->request, &call->response,
                           [call](grpc::Status status) { std::move(call->done)(FromGrpcStatus(status)); });
  return call;
}

}  // namespace kiln
