// ParallelFor: runs fn(0) … fn(n-1) on up to `threads` threads (the caller's
// among them), for I/O-bound work such as many small transfers. The first
// error stops the items not yet begun and is returned.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace kiln {

inline absl::Status ParallelFor(size_t n, int threads, absl::FunctionRef<absl::Status(size_t)> fn) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  absl::Status first_error;
  auto work = [&] {
    for (size_t i = next++; i < n && !failed.load(); i = next++) {
      absl::Status s = fn(i);
      if (!s.ok()) {
        absl::MutexLock lock(&mu);
        if (first_error.ok()) first_error = std::move(s);
        failed = true;
        return;
      }
    }
  };
  const size_t count = std::min(n, static_cast<size_t>(std::max(1, threads)));
  std::vector<std::thread> pool;
  for (size_t t = 1; t < count; ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  absl::MutexLock lock(&mu);
  return first_error;
}

}  // namespace kiln
