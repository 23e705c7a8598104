// The farm store: a Nix binary cache that workers fill with what they build
// and that workers, laptops and CI runners substitute from. FarmStore is the
// seam (the object-storage backend will be a second implementation);
// LocalFarmStore keeps one record per store path in the state's RocksDB
// (column family `nars`: the path's hash part -> its narinfo text, unsigned)
// and the NARs, zstd-compressed, as files in STATE/nar/.
//
// Every NAR added is read through NarReader (structure, bounds) while it is
// compressed to a temporary file; it must have the size and hash it was
// announced with, and every path it references must already be in the store
// (the closure property: a path is valid only with everything it needs). The
// body is renamed into place and synced before the record is written, so a
// crash in between leaves an unreferenced file and no visible path. Uploads
// of one path at the same time store it once.
//
// Signatures are made when a narinfo is served (SignNarInfo), with the key
// of the day: rotating the key needs no rewrite of the store.
//
// Garbage collection (CollectGarbage) keeps the store under a size: least
// recently used paths go first (a path is used when its narinfo is read;
// the time is kept in its NAR file's mtime, so it survives restarts), never
// a path that a path staying references (the closure property holds after
// every collection), never the closure of the pinned roots (the outputs of
// the most recent buildsets). A NAR file two paths share goes with the last
// of them. Records go first, then files: a crash between leaves unreferenced
// files, removed at the next Open.
#pragma once

#include <rocksdb/db.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/nar.h"
#include "common/narinfo.h"

namespace kiln {

struct FarmStoreStats {
  uint64_t paths = 0;
  uint64_t file_bytes = 0;  // The compressed NARs on disk.
};

struct FarmGcPolicy {
  uint64_t max_bytes = 0;                 // Collect when the NARs take more than this…
  uint64_t target_bytes = 0;              // …down to this (at most max_bytes).
  std::vector<std::string> pinned_roots;  // Store paths kept, with their closures.
};

struct FarmGcReport {
  uint64_t paths_collected = 0, bytes_collected = 0;
  uint64_t paths_pinned = 0;  // In the pinned closures.
  uint64_t paths_left = 0, bytes_left = 0;
};

class FarmStore {
 public:
  virtual ~FarmStore() = default;
  // The paths among `store_paths` the store does not hold.
  virtual absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& store_paths) = 0;
  // The narinfo of the path with this hash part (unsigned); NOT_FOUND if
  // the store does not hold it.
  virtual absl::StatusOr<NarInfo> Get(const std::string& hash_part) = 0;
  // Adds a path: `info` announces it (StorePath, NarHash, NarSize,
  // References, Deriver, CA; the rest is the store's), `nar` gives its NAR.
  // Already held: OK, `nar` unread.
  virtual absl::Status Add(const NarInfo& info, NarSource nar) = 0;
  // The file serving `nar/NAME` (NAME as a narinfo's URL gives it); NOT_FOUND
  // for any other name.
  virtual absl::StatusOr<std::string> NarFile(absl::string_view name) = 0;
  // What the store holds (kept as paths come and go; exact after each
  // collection).
  virtual FarmStoreStats Stats() const = 0;
  // Collects down to policy.target_bytes when the store holds more than
  // policy.max_bytes (nothing otherwise).
  virtual absl::StatusOr<FarmGcReport> CollectGarbage(const FarmGcPolicy& policy) = 0;
};

class LocalFarmStore final : public FarmStore {
 public:
  // `db`, `family` and `clock` outlive the store; NARs go to `nar_dir`
  // (created).
  static absl::StatusOr<std::unique_ptr<LocalFarmStore>> Open(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family,
                                                              std::string nar_dir, bool sync,
                                                              const Clock* clock = RealClock::Get());

  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& store_paths) override;
  absl::StatusOr<NarInfo> Get(const std::string& hash_part) override;
  absl::Status Add(const NarInfo& info, NarSource nar) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<std::string> NarFile(absl::string_view name) override;
  FarmStoreStats Stats() const override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<FarmGcReport> CollectGarbage(const FarmGcPolicy& policy) override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  LocalFarmStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family, std::string nar_dir, bool sync,
                 const Clock* clock)
      : db_(db), family_(family), nar_dir_(std::move(nar_dir)), sync_(sync), clock_(clock) {}
  absl::StatusOr<bool> Holds(const std::string& hash_part);
  // Scans the records: the stats, and NAR files no record names removed.
  absl::Status Load() ABSL_LOCKS_EXCLUDED(mu_);
  // Marks a path used now (its NAR file's mtime, at most hourly).
  void Touch(const std::string& hash_part, const NarInfo& info) ABSL_LOCKS_EXCLUDED(mu_);
  // Compresses and checks `nar` into a new file; fills the store's fields.
  absl::Status WriteBody(NarInfo& info, NarSource nar);

  rocksdb::DB* const db_;
  rocksdb::ColumnFamilyHandle* const family_;
  const std::string nar_dir_;
  const bool sync_;
  const Clock* const clock_;
  // Held while a record is written or collected: an upload's references
  // are checked, and its record written, with no collection in between.
  mutable absl::Mutex mu_;
  absl::flat_hash_set<std::string> adding_ ABSL_GUARDED_BY(mu_);  // Hash parts being added.
  FarmStoreStats stats_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, absl::Time> touched_ ABSL_GUARDED_BY(mu_);  // Hash part -> last mtime bump.
};

// `info` with a signature by `key` (replacing any other of that key's name).
absl::StatusOr<NarInfo> SignNarInfo(NarInfo info, const SigningKey& key);

}  // namespace kiln
