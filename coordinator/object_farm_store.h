// ObjectFarmStore: the farm store in an S3 bucket (Scaleway Object Storage in
// production), laid out as a Nix binary cache — `nix-cache-info`,
// `HASH.narinfo` (signed), `nar/FILEHASH.nar.zst` — so clients can
// substitute from the bucket's HTTPS endpoint directly, not only through the
// coordinator. The index of what the bucket holds stays in the state's
// RocksDB (IndexedFarmStore; family `object_nars`), which answers "which are
// missing" without a request to the bucket.
//
// Bodies reach the bucket two ways: through the coordinator (Add: checked
// and compressed as by LocalFarmStore, then PUT), or straight from a worker
// to a presigned URL (DirectUploadUrl, then CommitDirectUpload), so a
// worker's bytes need not pass through the coordinator; bucket credentials
// stay on the coordinator. A narinfo is written only after its body is
// complete (its size checked with a HEAD) and every reference is valid; a
// crash in between leaves a body no narinfo names, never a visible path.
//
// Narinfos in the bucket are signed when written, with the key of the day
// (rotating the key: see docs/OPERATIONS.md). When a path was last read is
// kept in memory only: after a restart, collection starts from the order of
// reads since.
#pragma once

#include <memory>
#include <string>

#include "coordinator/farm_store.h"
#include "coordinator/object_store.h"

namespace kiln {

class ObjectFarmStore final : public IndexedFarmStore {
 public:
  // How long a presigned URL handed out stays valid.
  static constexpr absl::Duration kUploadUrlLifetime = absl::Hours(1);
  static constexpr absl::Duration kReadUrlLifetime = absl::Minutes(15);

  // Writes `nix-cache-info` to the bucket (which checks the credentials and
  // the bucket at start). Bodies received are staged in `staging_dir`.
  static absl::StatusOr<std::unique_ptr<ObjectFarmStore>> Open(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family,
                                                               std::unique_ptr<ObjectStore> objects, SigningKey key,
                                                               std::string staging_dir, bool sync,
                                                               const Clock* clock = RealClock::Get());

  absl::StatusOr<NarLocation> LocateNar(absl::string_view name) override;
  absl::Status ReadNar(absl::string_view name, absl::FunctionRef<absl::Status(absl::string_view)> sink) override;
  bool TakesDirectUploads() const override { return true; }
  absl::StatusOr<std::string> DirectUploadUrl(const NarInfo& info) override;
  absl::Status CommitDirectUpload(const NarInfo& info) override ABSL_LOCKS_EXCLUDED(mu_);

  ObjectStore* objects() { return objects_.get(); }

 private:
  ObjectFarmStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family, std::unique_ptr<ObjectStore> objects,
                  SigningKey key, std::string staging_dir, bool sync, const Clock* clock)
      : IndexedFarmStore(db, family, sync, clock),
        objects_(std::move(objects)),
        key_(std::move(key)),
        staging_dir_(std::move(staging_dir)),
        opened_(clock->Now()) {}

  absl::Status StoreBody(NarInfo& info, NarSource nar) override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status CheckBodyKept(const NarInfo& info) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Publish(const NarInfo& info) override;
  void Unpublish(const NarInfo& info) override;
  absl::Time LastUsed(const std::string& hash_part, const NarInfo& info) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Touch(const std::string& hash_part, const NarInfo& info) override ABSL_LOCKS_EXCLUDED(mu_);
  void RemoveBodies(const std::vector<std::string>& files, const std::vector<NarInfo>& collected) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Notes that the body of the path being added is in the bucket now.
  void BodyStored(const NarInfo& info) ABSL_LOCKS_EXCLUDED(mu_);

  const std::unique_ptr<ObjectStore> objects_;
  const SigningKey key_;
  const std::string staging_dir_;
  const absl::Time opened_;  // What paths unread since count as last used.
  absl::flat_hash_map<std::string, absl::Time> touched_ ABSL_GUARDED_BY(mu_);
  // Collections that removed bodies, and the count when each add being
  // made had its body in place: the same count at the record means no body
  // went meanwhile (no request to the bucket under the lock).
  uint64_t removals_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<std::string, uint64_t> stored_at_ ABSL_GUARDED_BY(mu_);  // Store path -> removals_.
};

}  // namespace kiln
