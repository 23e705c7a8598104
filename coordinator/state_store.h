// StateStore: where the coordinator keeps what must survive a crash — job
// records, the source-tree blobs queued jobs need, and id counters.
//
// Every Commit is atomic: after a crash either all of it is there or none.
// Implementations: RocksDbStateStore (production); tests may use the same
// class on a temporary directory.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "kiln/state/v1/records.pb.h"

namespace kiln {

struct StateWrite {
  std::vector<const kiln::state::v1::JobRecord*> jobs;
  // (sha256 hex, bytes) of source-tree blobs.
  std::vector<std::pair<std::string, std::string>> blobs;
  // Next job / buildset sequence numbers to hand out, when they changed.
  uint64_t next_job_seq = 0;
  uint64_t next_buildset_seq = 0;

  bool empty() const {
    return jobs.empty() && blobs.empty() && next_job_seq == 0 && next_buildset_seq == 0;
  }
};

struct StoredCounters {
  uint64_t next_job_seq = 1;
  uint64_t next_buildset_seq = 1;
};

class StateStore {
 public:
  virtual ~StateStore() = default;

  virtual absl::Status Commit(const StateWrite& write) = 0;

  // NotFound when no blob has that digest.
  virtual absl::StatusOr<std::string> GetBlob(const std::string& sha256_hex) = 0;

  // Calls `fn` with every job record, in job-id order, one at a time (a
  // million records need not be held twice).
  virtual absl::Status ForEachJob(absl::FunctionRef<void(kiln::state::v1::JobRecord&&)> fn) = 0;

  // Every job record, in job-id order.
  absl::StatusOr<std::vector<kiln::state::v1::JobRecord>> LoadJobs() {
    std::vector<kiln::state::v1::JobRecord> out;
    absl::Status s = ForEachJob([&](kiln::state::v1::JobRecord&& r) { out.push_back(std::move(r)); });
    if (!s.ok()) return s;
    return out;
  }

  virtual absl::StatusOr<StoredCounters> LoadCounters() = 0;
};

}  // namespace kiln
