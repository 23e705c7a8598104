// BuildThreads: one thread per build for executors whose builds wait on
// processes and RPCs in turn; a thread is joined once its work has ended
// (by a later Start, or at the latest by the destructor), so none runs on
// after its owner.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace kiln {

class BuildThreads {
 public:
  BuildThreads() = default;
  BuildThreads(const BuildThreads&) = delete;
  BuildThreads& operator=(const BuildThreads&) = delete;
  // Joins every thread: the owner makes their work end first.
  ~BuildThreads();

  // Joins the threads whose work has ended, then runs `work` on a new one.
  void Start(uint64_t id, absl::AnyInvocable<void() &&> work) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void JoinEnded() ABSL_LOCKS_EXCLUDED(mu_);

  absl::Mutex mu_;
  absl::flat_hash_map<uint64_t, std::thread> threads_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> ended_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
