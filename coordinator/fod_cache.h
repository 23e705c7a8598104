// FodCache: the coordinator's record of what each fixed-output derivation
// really hashes to, keyed by its FOD key (common/derivation.h).
//
// RocksDB column families:
//   fod        key (hex) -> kiln.v1.FodEntry
//   fod_names  name \0 SRI hash -> key, one per (name, hash) ever computed
// The second one catches the silent stale case: a declared hash with no
// entry under its own key, but computed earlier for a FOD of the same name
// with other inputs (the lockfile changed, the hash did not).
//
// Independent of the scheduler: workers and the CLI call it from gRPC's
// threads; a mutex serialises read-modify-write of entries.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "coordinator/fod_hash_store.h"
#include "kiln/v1/fod.pb.h"

namespace kiln {

class FodCache final : public FodHashStore {
 public:
  FodCache(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* entries, rocksdb::ColumnFamilyHandle* names,
           const Clock* clock, bool sync);

  // One verdict per FOD, in order; a hit counts on its entry.
  absl::StatusOr<std::vector<kiln::v1::FodVerdict>> Check(const std::vector<kiln::v1::FodRef>& fods) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Stores outcomes: a new key gets an entry; a known key whose hash differs
  // is marked nondeterministic (its keys are returned).
  absl::StatusOr<std::vector<std::string>> Record(const std::vector<kiln::v1::FodOutcome>& outcomes,
                                                  const std::string& job_id, const std::string& worker) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Entries by name and/or key prefix, in key order.
  absl::StatusOr<std::vector<kiln::v1::FodEntry>> List(const std::string& name, const std::string& key_prefix,
                                                       uint32_t limit) const override;
  absl::StatusOr<uint32_t> Forget(const std::vector<std::string>& key_prefixes, const std::string& name) override
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<kiln::v1::ImportFodsResponse> Import(const std::vector<kiln::v1::FodEntry>& entries) override
      ABSL_LOCKS_EXCLUDED(mu_);

  // Entries stored, as RocksDB estimates it (no scan).
  uint64_t size() const override;

 private:
  absl::StatusOr<bool> Get(const std::string& key, kiln::v1::FodEntry* entry) const;
  absl::Status Write(rocksdb::WriteBatch& batch);
  static std::string NameKey(const std::string& name, const std::string& hash);

  rocksdb::DB* const db_;
  rocksdb::ColumnFamilyHandle* const entries_;
  rocksdb::ColumnFamilyHandle* const names_;
  const Clock* const clock_;
  const bool sync_;

  // Serialises read-modify-write of entries (hit counts, records, imports).
  mutable absl::Mutex mu_;
};

}  // namespace kiln
