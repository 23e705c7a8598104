#include "worker/build_threads.h"

#include <utility>

namespace kiln {

BuildThreads::~BuildThreads() {
  absl::flat_hash_map<uint64_t, std::thread> all;
  {
    absl::MutexLock lock(&mu_);
    all.swap(threads_);
  }
  for (auto& [id, t] : all) t.join();
}

void BuildThreads::JoinEnded() {
  std::vector<std::thread> ended;
  {
    absl::MutexLock lock(&mu_);
    for (uint64_t id : ended_) {
      auto it = threads_.find(id);
      if (it == threads_.end()) continue;
      ended.push_back(std::move(it->second));
      threads_.erase(it);
    }
    ended_.clear();
  }
  for (std::thread& t : ended) t.join();
}

void BuildThreads::Start(uint64_t id, absl::AnyInvocable<void() &&> work) {
  JoinEnded();
  absl::MutexLock lock(&mu_);
  // The thread marks itself ended under mu_, which is held here until it
  // is in the map.
  threads_.emplace(id, std::thread([this, id, work = std::move(work)]() mutable {
                     std::move(work)();
                     absl::MutexLock lock(&mu_);
                     ended_.push_back(id);
                   }));
}

}  // namespace kiln
