// The farm store: a Nix binary cache that workers fill with what they build
// and that workers, laptops and CI runners substitute from. FarmStore is the
// seam; both backends keep one record per store path in the state's RocksDB
// (the path's hash part -> its narinfo text, unsigned: IndexedFarmStore).
// LocalFarmStore (the default; column family `nars`) keeps the NARs,
// zstd-compressed, as files in STATE/nar/; ObjectFarmStore (column family
// `object_nars`, coordinator/object_farm_store.h) keeps them, and signed
// narinfos, in an S3 bucket laid out as a binary cache.
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
#include "common/nar_file.h"
#include "common/narinfo.h"
#include "absl/functional/function_ref.h"

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

// Where a NAR is read: a file on this host, or a URL the reader may fetch
// for a while (object storage).
struct NarLocation {
  std::string file;
  std::string url;
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
  // Where `nar/NAME` (NAME as a narinfo's URL gives it) is read; NOT_FOUND
  // for any other name.
  virtual absl::StatusOr<NarLocation> LocateNar(absl::string_view name) = 0;
  // The bytes of `nar/NAME`, piece by piece (for readers that cannot follow
  // a URL).
  virtual absl::Status ReadNar(absl::string_view name, absl::FunctionRef<absl::Status(absl::string_view)> sink) = 0;
  // Uploads whose bodies bypass the coordinator (object storage; others
  // answer UNIMPLEMENTED): a URL to PUT the compressed NAR `info` describes
  // (its FileHash, FileSize and URL set by the uploader)…
  virtual bool TakesDirectUploads() const { return false; }
  virtual absl::StatusOr<std::string> DirectUploadUrl(const NarInfo& info);
  // …and, once the body is there, the path made valid (the same checks as
  // Add but the NAR's own, which its readers make: Nix checks the NarHash
  // of every NAR it substitutes).
  virtual absl::Status CommitDirectUpload(const NarInfo& info);
  // What the store holds (kept as paths come and go; exact after each
  // collection).
  virtual FarmStoreStats Stats() const = 0;
  // Collects down to policy.target_bytes when the store holds more than
  // policy.max_bytes (nothing otherwise).
  virtual absl::StatusOr<FarmGcReport> CollectGarbage(const FarmGcPolicy& policy) = 0;
};

// What both stores share: one record per path in a RocksDB column family
// (hash part -> unsigned narinfo), the closure property, one upload of a
// path at a time, the stats, and collection by PlanFarmGc. A backend keeps
// the bodies.
class IndexedFarmStore : public FarmStore {
 public:
  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& store_paths) override;
  absl::StatusOr<NarInfo> Get(const std::string& hash_part) override;
  absl::Status Add(const NarInfo& info, NarSource nar) override ABSL_LOCKS_EXCLUDED(mu_);
  FarmStoreStats Stats() const override ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<FarmGcReport> CollectGarbage(const FarmGcPolicy& policy) override ABSL_LOCKS_EXCLUDED(mu_);

 protected:
  IndexedFarmStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family, bool sync, const Clock* clock)
      : db_(db), family_(family), sync_(sync), clock_(clock) {}

  // Scans the records for the stats; the names of the bodies they use.
  absl::StatusOr<absl::flat_hash_set<std::string>> LoadRecords() ABSL_LOCKS_EXCLUDED(mu_);
  // Checks and keeps the body of a path `info` announces; fills in URL,
  // Compression, FileHash and FileSize.
  virtual absl::Status StoreBody(NarInfo& info, NarSource nar) = 0;
  // Under the lock, before the record is written: the body `info` names is
  // still there (a collection may have removed a shared one meanwhile).
  virtual absl::Status CheckBodyKept(const NarInfo& info) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  // Before the record is written: the path shown where readers look
  // besides the index (object storage: the signed narinfo). Undone by
  // Unpublish when the record is then not written.
  virtual absl::Status Publish(const NarInfo&) { return absl::OkStatus(); }
  virtual void Unpublish(const NarInfo&) {}
  // When a path was last read (for collection), and a read now.
  virtual absl::Time LastUsed(const std::string& hash_part, const NarInfo& info) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;
  virtual void Touch(const std::string& hash_part, const NarInfo& info) {}
  // After a collection removed these paths' records: their bodies go.
  virtual void RemoveBodies(const std::vector<std::string>& files, const std::vector<NarInfo>& collected)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) = 0;

  // Waits for any other upload of the path; false when it is held now.
  absl::StatusOr<bool> BeginAdd(const std::string& hash_part) ABSL_LOCKS_EXCLUDED(mu_);
  // The second half of an add BeginAdd began: references and body checked
  // again under the lock, published, recorded.
  absl::Status FinishAdd(const std::string& hash_part, const NarInfo& stored, absl::Status status)
      ABSL_LOCKS_EXCLUDED(mu_);
  // FAILED_PRECONDITION naming the first reference the store lacks.
  absl::Status CheckReferences(const NarInfo& info);
  absl::StatusOr<bool> Holds(const std::string& hash_part);

  rocksdb::DB* const db_;
  rocksdb::ColumnFamilyHandle* const family_;
  const bool sync_;
  const Clock* const clock_;
  // Held while a record is written or collected: an upload's references
  // are checked, and its record written, with no collection in between.
  mutable absl::Mutex mu_;
  absl::flat_hash_set<std::string> adding_ ABSL_GUARDED_BY(mu_);  // Hash parts being added.
  FarmStoreStats stats_ ABSL_GUARDED_BY(mu_);
};

class LocalFarmStore final : public IndexedFarmStore {
 public:
  // `db`, `family` and `clock` outlive the store; NARs go to `nar_dir`
  // (created).
  static absl::StatusOr<std::unique_ptr<LocalFarmStore>> Open(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family,
                                                              std::string nar_dir, bool sync,
                                                              const Clock* clock = RealClock::Get());

  absl::StatusOr<NarLocation> LocateNar(absl::string_view name) override;
  absl::Status ReadNar(absl::string_view name, absl::FunctionRef<absl::Status(absl::string_view)> sink) override;

 private:
  LocalFarmStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family, std::string nar_dir, bool sync,
                 const Clock* clock)
      : IndexedFarmStore(db, family, sync, clock), nar_dir_(std::move(nar_dir)) {}
  absl::Status StoreBody(NarInfo& info, NarSource nar) override;
  absl::Status CheckBodyKept(const NarInfo& info) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Time LastUsed(const std::string& hash_part, const NarInfo& info) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks a path used now (its NAR file's mtime, at most hourly).
  void Touch(const std::string& hash_part, const NarInfo& info) override ABSL_LOCKS_EXCLUDED(mu_);
  void RemoveBodies(const std::vector<std::string>& files, const std::vector<NarInfo>& collected) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string nar_dir_;
  absl::flat_hash_map<std::string, absl::Time> touched_ ABSL_GUARDED_BY(mu_);  // Hash part -> last mtime bump.
};

// A compressed NAR checked against what `info` announces (size, hash, the
// NAR's structure through NarReader), in a new file in `dir`.
absl::StatusOr<CompressedNar> CompressCheckedNar(const NarInfo& info, NarSource nar, const std::string& dir, bool sync);

// Checks a narinfo as an uploader announces it: a store path under
// /nix/store, references as base names (full paths taken), sorted.
absl::StatusOr<NarInfo> NormalizeAnnounced(const NarInfo& announced);

// `info` with a signature by `key` (replacing any other of that key's name).
absl::StatusOr<NarInfo> SignNarInfo(NarInfo info, const SigningKey& key);

}  // namespace kiln
