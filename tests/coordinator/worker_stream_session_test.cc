// WorkerStreamSession over recording hooks in place of a gRPC reactor (a
// fake at the stream seam): Send refuses once the stream is closing or its
// queue is full, as WorkerSession promises.
#include "coordinator/worker_stream_session.h"

#include <gtest/gtest.h>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;

// Records writes; never completes one (a worker that stopped reading), so
// every later message stays queued.
struct RecordingStream {
  absl::Mutex mu;
  int writes = 0;
  bool finished = false;
  grpc::Status status;
  OutboundQueue<CoordinatorMessage>::Hooks Hooks() {
    OutboundQueue<CoordinatorMessage>::Hooks hooks;
    hooks.start_write = [this](const CoordinatorMessage*) {
      absl::MutexLock lock(&mu);
      ++writes;
    };
    hooks.finish = [this](grpc::Status s) {
      absl::MutexLock lock(&mu);
      finished = true;
      status = s;
    };
    return hooks;
  }
};

// Waits until the sender thread has run everything posted so far.
void Drain(SerialExecutor& sender) {
  absl::Notification done;
  sender.Post([&] { done.Notify(); });
  done.WaitForNotification();
}

TEST(WorkerStreamSession, SendRefusesOnceTheStreamIsClosing) {
  RecordingStream stream;
  SerialExecutor sender("test-sender");
  auto session = std::make_shared<WorkerStreamSession>(stream.Hooks(), &sender, 8);
  EXPECT_TRUE(session->Send(CoordinatorMessage()));
  Drain(sender);
  session->Close(absl::UnavailableError("shutting down"));
  EXPECT_FALSE(session->Send(CoordinatorMessage()));
  Drain(sender);
  absl::MutexLock lock(&stream.mu);
  EXPECT_EQ(stream.writes, 1);
}

TEST(WorkerStreamSession, SendRefusesWhenTheWorkerStoppedReadingAndEndsTheStream) {
  RecordingStream stream;
  SerialExecutor sender("test-sender");
  auto session = std::make_shared<WorkerStreamSession>(stream.Hooks(), &sender, 4);
  int accepted = 0;
  for (int i = 0; i < 10; ++i) accepted += session->Send(CoordinatorMessage()) ? 1 : 0;
  EXPECT_EQ(accepted, 4) << "the capacity counts messages not yet handed to the stream too";
  Drain(sender);
  EXPECT_TRUE(session->queue().finish_requested());
  // The stream drains what it had queued (all of it or, had the refusal come
  // before the sender thread ran, none), then ends.
  for (int i = 0; i < 4 && session->queue().size() > 0; ++i) session->queue().OnWriteDone(true);
  absl::MutexLock lock(&stream.mu);
  EXPECT_TRUE(stream.finished);
  EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

}  // namespace
}  // namespace kiln
