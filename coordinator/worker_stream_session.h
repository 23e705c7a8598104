// WorkerStreamSession: the coordinator's WorkerSession on a worker's gRPC
// stream. Messages go to one sender thread (starting a gRPC write runs the
// transport's write path on the calling thread, which would otherwise be the
// strand's), in posting order, then into the stream's bounded OutboundQueue.
//
// Send keeps its interface's promise: false, and nothing queued, once the
// stream is closing, or when the messages waiting (on the sender thread and
// in the queue) reach the capacity — the worker stopped reading; the stream
// is then closed and the worker reconnects.
//
// Thread-safe.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>

#include "common/outbound_queue.h"
#include "common/serial_executor.h"
#include "coordinator/worker_registry.h"
#include "kiln/v1/workers.pb.h"

namespace kiln {

class WorkerStreamSession final : public WorkerSession, public std::enable_shared_from_this<WorkerStreamSession> {
 public:
  // Messages to a worker are few (assignments, cancels); a full queue means
  // the worker stopped reading.
  static constexpr size_t kCapacity = 4096;

  // `hooks` write to and finish the stream (its reactor).
  WorkerStreamSession(OutboundQueue<kiln::v1::CoordinatorMessage>::Hooks hooks, SerialExecutor* sender,
                      size_t capacity = kCapacity)
      : sender_(sender), capacity_(capacity), queue_(capacity, std::move(hooks)) {}

  bool Send(kiln::v1::CoordinatorMessage message) override;
  void Close(absl::Status status) override;

  OutboundQueue<kiln::v1::CoordinatorMessage>& queue() { return queue_; }

 private:
  SerialExecutor* const sender_;
  const size_t capacity_;
  std::atomic<size_t> posted_{0};  // Handed to the sender thread, not yet queued.
  OutboundQueue<kiln::v1::CoordinatorMessage> queue_;
};

}  // namespace kiln
