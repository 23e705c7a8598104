// InMemoryStateStore: a fake at the StateStore seam — maps in memory, with
// the real store's observable rules (atomic commits, records in numeric
// job-id order, default counters, NotFound for what is absent).
// tests/coordinator/state_store_contract_test.cc runs the same cases on it
// and on RocksDbStateStore, so the fake cannot drift from the real thing.
#pragma once

#include <map>
#include <string>

#include "absl/synchronization/mutex.h"
#include "coordinator/state_store.h"

namespace kiln::testing {

class InMemoryStateStore final : public StateStore {
 public:
  absl::Status Commit(const StateWrite& write) override {
    absl::MutexLock lock(&mu_);
    for (const kiln::state::v1::JobRecord* r : write.jobs) jobs_[r->job_id()] = r->SerializeAsString();
    for (const auto& [id, bytes] : write.packed_jobs) jobs_[*id] = *bytes;
    for (const auto& [key, entry] : write.cached_results) results_[key] = *entry;
    for (const auto& [hash, bytes] : write.blobs) blobs_[hash] = bytes;
    for (const auto& [id, bytes] : write.logs) logs_[id] = bytes;
    for (const std::string& id : write.deleted_logs) logs_.erase(id);
    if (write.next_job_seq != 0) counters_.next_job_seq = write.next_job_seq;
    if (write.next_buildset_seq != 0) counters_.next_buildset_seq = write.next_buildset_seq;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> GetBlob(const std::string& sha256_hex) override {
    absl::MutexLock lock(&mu_);
    auto it = blobs_.find(sha256_hex);
    if (it == blobs_.end()) return absl::NotFoundError(absl::StrCat("no blob ", sha256_hex));
    return it->second;
  }
  absl::StatusOr<std::string> GetLog(const std::string& job_id) override {
    absl::MutexLock lock(&mu_);
    auto it = logs_.find(job_id);
    if (it == logs_.end()) return absl::NotFoundError(absl::StrCat("no stored log of job ", job_id));
    return it->second;
  }
  absl::Status ForEachPackedJob(absl::FunctionRef<absl::Status(absl::string_view)> fn) override {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, bytes] : jobs_) {
      if (absl::Status s = fn(bytes); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  absl::StatusOr<StoredCounters> LoadCounters() override {
    absl::MutexLock lock(&mu_);
    return counters_;
  }
  absl::StatusOr<kiln::state::v1::CachedResult> GetCachedResult(const std::string& key) override {
    absl::MutexLock lock(&mu_);
    auto it = results_.find(key);
    if (it == results_.end()) return absl::NotFoundError(absl::StrCat("no cached result under ", key));
    return it->second;
  }

 private:
  // Job ids are decimal numbers: shorter ones first, then as text.
  struct NumericOrder {
    bool operator()(const std::string& a, const std::string& b) const {
      return a.size() != b.size() ? a.size() < b.size() : a < b;
    }
  };
  absl::Mutex mu_;
  std::map<std::string, std::string, NumericOrder> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, kiln::state::v1::CachedResult> results_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> blobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> logs_ ABSL_GUARDED_BY(mu_);
  StoredCounters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln::testing
