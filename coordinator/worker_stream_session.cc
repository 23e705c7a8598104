#include "coordinator/worker_stream_session.h"

#include "common/grpc_util.h"

namespace kiln {

bool WorkerStreamSession::Send(kiln::v1::CoordinatorMessage message) {
  if (queue_.finish_requested()) return false;
  if (posted_.fetch_add(1) + 1 + queue_.size() > capacity_) {
    posted_.fetch_sub(1);
    Close(absl::ResourceExhaustedError("worker is not reading its stream"));
    return false;
  }
  sender_->Post([self = shared_from_this(), m = std::move(message)]() mutable {
    self->posted_.fetch_sub(1);
    // Full or closed meanwhile: the stream ends (the worker reconnects).
    if (self->queue_.Push(std::move(m)) == OutboundQueue<kiln::v1::CoordinatorMessage>::PushResult::kFull) {
      self->Close(absl::ResourceExhaustedError("worker is not reading its stream"));
    }
  });
  return true;
}

void WorkerStreamSession::Close(absl::Status status) { queue_.Finish(ToGrpcStatus(status)); }

}  // namespace kiln
