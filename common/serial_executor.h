// SerialExecutor runs closures one at a time, in submission order, on a thread
// it owns. It is how Kiln keeps gRPC reactions non-blocking: a reaction posts
// work here and returns at once, and the state the executor's closures touch
// has a single owner, so it needs no lock of its own.
#pragma once

#include <deque>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace kiln {

class SerialExecutor {
 public:
  explicit SerialExecutor(std::string name);
  // Runs the closures already posted, then joins the thread.
  ~SerialExecutor();

  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  // Thread-safe. Closures posted after shutdown began are dropped.
  void Post(absl::AnyInvocable<void() &&> fn) ABSL_LOCKS_EXCLUDED(mu_);

  // `fn` runs on the executor after each batch of closures (those posted
  // while the previous batch ran): where a user gathers work across a
  // batch, e.g. one storage write for many events. Set it before posting.
  void SetAfterBatch(absl::AnyInvocable<void()> fn) ABSL_LOCKS_EXCLUDED(mu_);

  // True when called from a closure running on this executor.
  bool IsCurrent() const;

  // Number of closures waiting (for metrics and tests).
  size_t Pending() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run();

  const std::string name_;
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Called by the executor's thread only; set before any closure is posted.
  absl::AnyInvocable<void()> after_batch_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace kiln
