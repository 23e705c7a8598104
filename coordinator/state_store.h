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
#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "kiln/state/v1/records.pb.h"

namespace kiln {

struct StateWrite {
  std::vector<const kiln::state::v1::JobRecord*> jobs;
  // Records already serialized: (job id, serialized JobRecord).
  std::vector<std::pair<const std::string*, const std::string*>> packed_jobs;
  // (result key, CachedResult) entries of the result cache.
  std::vector<std::pair<std::string, const kiln::state::v1::CachedResult*>> cached_results;
  // (sha256 hex, bytes) of source-tree blobs.
  std::vector<std::pair<std::string, std::string>> blobs;
  // Finished jobs' logs: (job id, EncodeStoredLog bytes); and job ids whose
  // logs the retention limit removes.
  std::vector<std::pair<std::string, std::string>> logs;
  std::vector<std::string> deleted_logs;
  // Next job / buildset sequence numbers to hand out, when they changed.
  uint64_t next_job_seq = 0;
  uint64_t next_buildset_seq = 0;

  bool empty() const {
    return jobs.empty() && packed_jobs.empty() && cached_results.empty() && blobs.empty() && logs.empty() &&
           deleted_logs.empty() && next_job_seq == 0 && next_buildset_seq == 0;
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

  // After a write failed (say, the disk was full): makes the store take
  // writes again if it can now, else says why not.
  virtual absl::Status Resume() { return absl::OkStatus(); }

  // Bytes free on the file system the store writes to.
  virtual uint64_t FreeBytes() const { return UINT64_MAX; }

  // NotFound when no blob has that digest.
  virtual absl::StatusOr<std::string> GetBlob(const std::string& sha256_hex) = 0;

  // A finished job's stored log (EncodeStoredLog bytes); NotFound if none.
  // Thread-safe: read off the strand.
  virtual absl::StatusOr<std::string> GetLog(const std::string& job_id) = 0;

  // Calls `fn` with every serialized job record, in job-id order, one at a
  // time (a million records need not be held twice); stops at its first error.
  virtual absl::Status ForEachPackedJob(absl::FunctionRef<absl::Status(absl::string_view)> fn) = 0;

  // The same, parsed.
  absl::Status ForEachJob(absl::FunctionRef<void(kiln::state::v1::JobRecord&&)> fn) {
    return ForEachPackedJob([&](absl::string_view bytes) {
      kiln::state::v1::JobRecord record;
      if (!record.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
        return absl::DataLossError("unreadable job record");
      }
      fn(std::move(record));
      return absl::OkStatus();
    });
  }

  // Every job record, in job-id order.
  absl::StatusOr<std::vector<kiln::state::v1::JobRecord>> LoadJobs() {
    std::vector<kiln::state::v1::JobRecord> out;
    absl::Status s = ForEachJob([&](kiln::state::v1::JobRecord&& r) { out.push_back(std::move(r)); });
    if (!s.ok()) return s;
    return out;
  }

  virtual absl::StatusOr<StoredCounters> LoadCounters() = 0;

  // The result cache's entry under `key`; NotFound when there is none.
  virtual absl::StatusOr<kiln::state::v1::CachedResult> GetCachedResult(const std::string& key) = 0;
};

}  // namespace kiln
