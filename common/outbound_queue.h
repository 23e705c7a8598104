// OutboundQueue: the one way Kiln writes to a gRPC stream from outside its
// reactions.
//
// gRPC's callback API allows one write in flight per stream. Producers (the
// coordinator's strand, a worker's builds) Push messages from any thread; the
// queue starts the next write when the previous one is done, holds at most
// `capacity` messages (a slow reader cannot make us grow without bound), and
// calls `finish` exactly once, after the writes queued before Finish() drained.
// Hooks run outside the lock; the stream must stay valid until `finish` ran.
#pragma once

#include <cstddef>
#include <deque>
#include <utility>

#include <grpcpp/support/status.h>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace kiln {

template <typename Msg>
class OutboundQueue {
 public:
  struct Hooks {
    absl::AnyInvocable<void(const Msg*)> start_write;
    absl::AnyInvocable<void(grpc::Status)> finish;
  };

  enum class PushResult { kQueued, kFull, kClosed };

  OutboundQueue(size_t capacity, Hooks hooks) : capacity_(capacity), hooks_(std::move(hooks)) {}

  // `force` ignores the capacity: for the few messages that must not be lost
  // (a terminal event), never for a stream of them.
  PushResult Push(Msg msg, bool force = false) ABSL_LOCKS_EXCLUDED(mu_) {
    const Msg* to_write = nullptr;
    {
      absl::MutexLock lock(&mu_);
      if (finish_requested_) return PushResult::kClosed;
      if (!force && queue_.size() >= capacity_) return PushResult::kFull;
      queue_.push_back(std::move(msg));
      if (!writing_) {
        writing_ = true;
        to_write = &queue_.front();  // deque keeps references on push_back.
      }
    }
    if (to_write) hooks_.start_write(to_write);
    return PushResult::kQueued;
  }

  // Ends the stream with `status` once the queued messages are written.
  // Later calls are ignored.
  void Finish(grpc::Status status) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      absl::MutexLock lock(&mu_);
      if (finish_requested_) return;
      finish_requested_ = true;
      status_ = std::move(status);
      if (writing_) return;  // OnWriteDone finishes.
      finished_ = true;
    }
    hooks_.finish(status_);
  }

  // To be called from the reactor's OnWriteDone.
  void OnWriteDone(bool ok) ABSL_LOCKS_EXCLUDED(mu_) {
    const Msg* to_write = nullptr;
    bool finish_now = false;
    {
      absl::MutexLock lock(&mu_);
      queue_.pop_front();
      if (!ok) {
        // The stream is broken: nothing more can be written.
        queue_.clear();
        if (!finish_requested_) {
          finish_requested_ = true;
          status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream broken");
        }
      }
      if (!queue_.empty()) {
        to_write = &queue_.front();
      } else {
        writing_ = false;
        if (finish_requested_ && !finished_) finish_now = finished_ = true;
      }
    }
    if (to_write) hooks_.start_write(to_write);
    if (finish_now) hooks_.finish(status_);
  }

  size_t size() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return queue_.size();
  }

  bool finish_requested() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return finish_requested_;
  }

 private:
  const size_t capacity_;
  Hooks hooks_;
  mutable absl::Mutex mu_;
  std::deque<Msg> queue_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_;  // Written before finished_ is set, read after.
};

}  // namespace kiln
