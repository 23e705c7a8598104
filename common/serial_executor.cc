#include "common/serial_executor.h"

#include <utility>

#include <pthread.h>

namespace kiln {

SerialExecutor::SerialExecutor(std::string name) : name_(std::move(name)) {
  thread_ = std::thread([this] { Run(); });
}

SerialExecutor::~SerialExecutor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

void SerialExecutor::Post(absl::AnyInvocable<void() &&> fn) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  queue_.push_back(std::move(fn));
}

void SerialExecutor::SetAfterBatch(absl::AnyInvocable<void()> fn) {
  absl::MutexLock lock(&mu_);
  after_batch_ = std::move(fn);
}

bool SerialExecutor::IsCurrent() const { return std::this_thread::get_id() == thread_.get_id(); }

size_t SerialExecutor::Pending() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

void SerialExecutor::Run() {
#ifdef __linux__
  // Visible in top -H and profiles (at most 15 characters).
  pthread_setname_np(pthread_self(), name_.substr(0, 15).c_str());
#endif
  for (;;) {
    std::deque<absl::AnyInvocable<void() &&>> batch;
    absl::AnyInvocable<void()>* after = nullptr;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](SerialExecutor* self)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(self->mu_) { return self->stopping_ || !self->queue_.empty(); },
          this));
      if (queue_.empty()) return;  // Stopping and drained.
      batch.swap(queue_);
      if (after_batch_) after = &after_batch_;
    }
    for (auto& fn : batch) std::move(fn)();
    if (after != nullptr) (*after)();
  }
}

}  // namespace kiln
