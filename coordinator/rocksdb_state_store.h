// RocksDbStateStore: StateStore on RocksDB.
//
// Layout (column families):
//   default  "meta/next_job_seq", "meta/next_buildset_seq" -> decimal text
//   jobs     20-digit zero-padded job id -> JobRecord (protobuf)
//   blobs    sha256 hex -> blob bytes (RocksDB blob files keep large
//            values out of the LSM tree); chunks of large blobs (CasStore)
//   blob_meta sha256 hex -> BlobMeta (CasStore)
//   results  result key (sha256 hex) -> CachedResult
//   fod, fod_names  the FOD hash cache (FodCache)
//   tokens   token id -> StoredToken (TokenStore)
//   nars     store path hash part -> narinfo text (LocalFarmStore; NARs in nar/)
//   object_nars  the same for ObjectFarmStore (NARs in the bucket)
// The write-ahead log is on; `sync` makes every commit wait for fsync
// (survives power loss, not only a process crash).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <rocksdb/db.h>

#include "coordinator/cas_store.h"
#include "coordinator/fod_cache.h"
#include "common/clock.h"
#include "coordinator/state_store.h"
#include "coordinator/farm_store.h"
#include "coordinator/object_farm_store.h"
#include "coordinator/token_store.h"

namespace kiln {

class RocksDbStateStore final : public StateStore {
 public:
  // `clock` (null: the wall clock) times the FOD cache's entries.
  static absl::StatusOr<std::unique_ptr<RocksDbStateStore>> Open(const std::string& dir, bool sync,
                                                                 uint64_t max_blob_bytes = uint64_t{4} << 30,
                                                                 const Clock* clock = nullptr);
  ~RocksDbStateStore() override;

  absl::Status Commit(const StateWrite& write) override;
  // RocksDB stops all writes after one failed for lack of space; Resume
  // (DB::Resume) flushes what it holds and lets them through again.
  absl::Status Resume() override;
  uint64_t FreeBytes() const override;
  absl::StatusOr<std::string> GetBlob(const std::string& sha256_hex) override;
  absl::StatusOr<std::string> GetLog(const std::string& job_id) override;
  absl::Status ForEachPackedJob(absl::FunctionRef<absl::Status(absl::string_view)> fn) override;
  absl::StatusOr<StoredCounters> LoadCounters() override;
  absl::StatusOr<kiln::state::v1::CachedResult> GetCachedResult(const std::string& key) override;

  // The content-addressed blob store in the same database.
  CasStore* cas() { return cas_.get(); }
  // The fixed-output hash cache in the same database.
  FodCache* fod_cache() { return fod_cache_.get(); }
  // Client tokens in the same database.
  TokenStore* tokens() { return tokens_.get(); }
  // The farm store: records in the same database, NARs beside it (or in
  // a bucket after UseObjectStorage).
  FarmStore* farm_store() { return farm_store_.get(); }
  // The farm store's bodies and signed narinfos go to `objects` from now
  // on (its index in its own column family); `key` signs the narinfos.
  absl::Status UseObjectStorage(std::unique_ptr<ObjectStore> objects, SigningKey key);

  // What the database holds and whether writes are being held back, summed
  // over column families, read from RocksDB's properties (for /metrics).
  struct Stats {
    uint64_t sst_bytes = 0;
    uint64_t live_data_bytes = 0;
    uint64_t memtable_bytes = 0;
    uint64_t pending_compaction_bytes = 0;
    uint64_t running_compactions = 0;
    bool writes_stopped = false;
    uint64_t delayed_write_rate = 0;  // Bytes per second; 0 when not delayed.
    // Cumulative write stalls since the database was opened.
    uint64_t stops = 0;
    uint64_t slowdowns = 0;
  };
  Stats GetStats() const;
  // Just whether RocksDB stops writes now (one property; /readyz asks it).
  bool WritesStopped() const;

  // A consistent copy of the state in `destination` (absolute, not existing):
  // DEST/rocksdb is a RocksDB checkpoint (hard links where it can) with the
  // CAS's blob files in it, where the state keeps them (immutable:
  // hard-linked, or copied across file systems). DEST is a state directory.
  // Safe while the coordinator runs.
  struct BackupStats {
    uint64_t cas_files = 0;
    uint64_t nar_files = 0;
    uint64_t sst_bytes = 0;
    bool hard_linked = true;
  };
  absl::StatusOr<BackupStats> Backup(const std::string& destination);

  // The key a job id is stored under (exposed for the golden-format test).
  static std::string JobKey(const std::string& job_id);

 private:
  RocksDbStateStore() = default;

  std::unique_ptr<rocksdb::DB> db_;
  // default, jobs, blobs, blob_meta, results, fod, fod_names, tokens, logs, nars
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  bool sync_ = false;
  std::string cas_dir_;
  std::unique_ptr<CasStore> cas_;
  std::unique_ptr<FodCache> fod_cache_;
  std::unique_ptr<TokenStore> tokens_;
  std::string nar_dir_;
  std::unique_ptr<FarmStore> farm_store_;
};

}  // namespace kiln
