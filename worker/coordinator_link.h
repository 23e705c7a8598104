// CoordinatorLink: everything a worker says to and hears from the
// coordinator, behind one interface — the control stream (registration,
// assignments, cancels, results, heartbeats), the log call (bulk, apart from
// control) and the CAS (sources, outputs). GrpcCoordinatorLink is the real
// one; tests drive WorkerAgent through a fake (tests/worker/) to check what
// it does when the coordinator goes away, answers late or lacks a call.
//
// Thread-safe.
#pragma once

#include <memory>
#include <string>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "kiln/v1/cas.grpc.pb.h"
#include "kiln/v1/workers.grpc.pb.h"

namespace grpc {
class Channel;
}  // namespace grpc

namespace kiln {

// One control stream.
class ControlStream {
 public:
  virtual ~ControlStream() = default;
  // Queues `message`; false when the stream is closing, or when it is full
  // and the message `droppable` (a heartbeat).
  virtual bool Send(kiln::v1::WorkerMessage message, bool droppable) = 0;
  // Ends the stream; its on_done follows.
  virtual void Cancel() = 0;
};

struct ControlStreamHandlers {
  // Each message from the coordinator, in order, on the link's thread (it
  // must not block).
  absl::AnyInvocable<void(kiln::v1::CoordinatorMessage)> on_message;
  // Once, after every on_message: the stream ended. The stream is still
  // held by whoever connected it, and must be released after this (not
  // from it).
  absl::AnyInvocable<void(absl::Status)> on_done;
};

// A call in flight; cancelling one that has ended does nothing.
class PendingCall {
 public:
  virtual ~PendingCall() = default;
  virtual void Cancel() = 0;
};

class CoordinatorLink {
 public:
  virtual ~CoordinatorLink() = default;

  // Opens a control stream whose first message is `first` (a registration).
  virtual std::shared_ptr<ControlStream> Connect(kiln::v1::WorkerMessage first, ControlStreamHandlers handlers) = 0;

  // Sends one batch of log lines (deadline 30 s); `done` runs once with the
  // outcome (UNIMPLEMENTED: a coordinator without the call), on the link's
  // thread (possibly before this returns).
  virtual std::shared_ptr<PendingCall> SendLogs(kiln::v1::LogBatch batch,
                                                absl::AnyInvocable<void(absl::Status)> done) = 0;

  // The coordinator's CAS (sources not sent inline, outputs uploaded); null
  // where there is none (then sources must come inline).
  virtual kiln::v1::CasService::Stub* cas() = 0;
};

class GrpcCoordinatorLink final : public CoordinatorLink {
 public:
  explicit GrpcCoordinatorLink(std::shared_ptr<grpc::Channel> channel);
  ~GrpcCoordinatorLink() override;

  std::shared_ptr<ControlStream> Connect(kiln::v1::WorkerMessage first, ControlStreamHandlers handlers) override;
  std::shared_ptr<PendingCall> SendLogs(kiln::v1::LogBatch batch, absl::AnyInvocable<void(absl::Status)> done) override;
  kiln::v1::CasService::Stub* cas() override { return cas_.get(); }

 private:
  class Stream;
  struct LogCall;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kiln::v1::WorkerService::Stub> stub_;
  std::unique_ptr<kiln::v1::CasService::Stub> cas_;
};

}  // namespace kiln
