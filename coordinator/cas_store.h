// CasStore: the coordinator's content-addressed blob store.
//
// Three homes, by kind and size:
// - directories live in the state RocksDB (column family `blobs`): they are
//   small, few, and read whenever a parent or a submission is checked;
// - files up to kPackThreshold are appended to pack files
//   (packs/<n>.pack under the CAS directory), their place in the meta;
// - larger files are files of their own, named by their hash.
// Every blob has a BlobMeta in `blob_meta`, written last: a blob is visible
// only once its bytes are in place and its digest was checked. A directory
// is accepted only when every blob it names is present (child directories
// as directories), so a stored directory stands for its whole tree; its
// meta carries the tree's summary (size, entries, depth, how far its links
// reach), so a submission checks a tree of any size with one lookup.
//
// Why not RocksDB for file bytes: Debian's RocksDB computes CRC32C in
// software, and a value goes through the write-ahead log, the memtable, a
// table at flush and again at every compaction. Measured on a 200 MB tree
// of 20 KB files, that was over a third of the coordinator's CPU while
// taking the upload. A pack is written once with one pwrite per blob, and
// needs no compaction: garbage collection punches the blob's range out of
// the pack (the disk space returns at once) and deletes a pack whose every
// blob is gone. A file per small blob would cost an inode and several
// system calls for each; a file of its own suits a large one.
//
// Thread-safe; uploads of different blobs run in parallel.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include <rocksdb/db.h>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/digest.h"
#include "coordinator/blob_store.h"
#include "common/source_tree.h"
#include "kiln/state/v1/records.pb.h"
#include "kiln/v1/types.pb.h"

namespace kiln {

class CasStore final : public BlobStore {
 public:
  static constexpr size_t kChunkBytes = size_t{1} << 20;      // Reads hand out at most this.
  static constexpr size_t kFileThreshold = size_t{64} << 10;  // Larger blobs are files.
  static constexpr size_t kPackThreshold = kFileThreshold;    // Smaller files go to packs.
  static constexpr uint64_t kPackBytes = uint64_t{64} << 20;  // A pack is closed past this.

  // `files_dir` holds the large blobs; `sync`: fsync a blob's file before
  // its meta is written (as --sync-writes does for state).
  CasStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* blobs, rocksdb::ColumnFamilyHandle* meta,
           std::string files_dir, uint64_t max_blob_bytes, bool sync);

  // For a backup: runs `checkpoint` (of the RocksDB state), then copies the
  // CAS's files (blobs and packs) under `dest`, garbage collection waiting
  // throughout, so every blob the checkpoint names is whole in the copy.
  // Files are hard-linked where possible (they never change); packs are
  // copied (a later collection punches ranges out of them).
  struct CopyStats {
    uint64_t files = 0;
    bool hard_linked = true;
  };
  absl::StatusOr<CopyStats> CopyFilesTo(const std::string& dest, absl::FunctionRef<absl::Status()> checkpoint);

  // NotFound when absent. Blobs stored before the CAS existed (inline
  // submissions) have no meta: they are reported as plain blobs.
  absl::StatusOr<kiln::state::v1::BlobMeta> Meta(const std::string& hash) const override;
  bool HasFile(const kiln::v1::Digest& digest) const;
  bool HasDirectory(const kiln::v1::Digest& digest) const override;

  // Calls `fn` with the blob's bytes, chunk by chunk, in order.
  absl::Status Read(const std::string& hash, absl::FunctionRef<absl::Status(absl::string_view)> fn) const;
  // The whole blob (directories and small files).
  absl::StatusOr<std::string> ReadAll(const std::string& hash) const override;

  // One blob being uploaded: Append its bytes in order, then Finish, which
  // checks the digest (and, for a directory, its children) and makes it
  // visible. Destroying an unfinished upload removes what it wrote.
  class Upload {
   public:
    ~Upload();
    absl::Status Append(absl::string_view data);
    // OK also when the blob was already present (nothing is written twice).
    absl::Status Finish();
    bool already_present() const { return already_present_; }

   private:
    friend class CasStore;
    Upload(CasStore* store, kiln::v1::Digest digest, bool is_directory);
    void Discard();

    CasStore* const store_;
    const kiln::v1::Digest digest_;
    const bool is_directory_;
    const bool to_file_;
    const bool to_pack_;
    Sha256 hasher_;
    std::string buffer_;     // A small blob's bytes.
    std::string temp_path_;  // A large blob's bytes, until renamed.
    int fd_ = -1;
    uint64_t received_ = 0;
    bool finished_ = false;
    bool already_present_ = false;
  };
  // Fails at once for a digest that is not a SHA-256 or a blob over the limit.
  absl::StatusOr<std::unique_ptr<Upload>> StartUpload(const kiln::v1::Digest& digest, bool is_directory);

  // Stores a whole blob (verifying it), e.g. from an inline submission;
  // `*stored` (if given) says whether it was new.
  absl::Status Put(const kiln::v1::Digest& digest, absl::string_view data, bool is_directory,
                   bool* stored = nullptr) override;

  // Bytes of every stored blob (kept as blobs come and go; summed at start).
  uint64_t total_bytes() const override { return total_bytes_.load(); }

  // Garbage collection, in the caller's policy: `keep` is every blob still
  // needed (the trees of queued and running jobs). Deletes blobs not kept
  // and stored before `older_than`, oldest first, until the store is at most
  // `target_bytes`; if it deleted any, it also deletes every directory not
  // kept (whatever its age), so a stored directory still stands for its
  // whole tree. Uploads wait while it deletes. Returns bytes freed.
  absl::StatusOr<uint64_t> CollectGarbage(const absl::flat_hash_set<std::string>& keep, int64_t older_than_unix,
                                          uint64_t target_bytes) override;

 private:
  // The summary of a directory whose children are all present; an error
  // names the first missing or mismatched child.
  absl::StatusOr<TreeSummary> SummariseDirectory(const kiln::v1::Digest& digest, absl::string_view data) const;

  std::string FilePath(const std::string& hash) const;
  std::string PackPath(uint64_t pack) const;

  // A pack being written or read. The descriptor closes with the last user,
  // so rolling over to a new pack never pulls it from under a writer.
  struct PackFile {
    uint64_t id = 0;
    int fd = -1;
    ~PackFile();
  };
  // Appends a verified blob to the current pack; the caller writes the meta.
  absl::Status AppendToPack(absl::string_view data, kiln::state::v1::BlobMeta& meta);
  // Gives back a blob's range in a pack (deleted, or never made visible):
  // punches it out, and deletes the pack once nothing in it is live.
  void ReleasePackRange(uint64_t pack, uint64_t offset, uint64_t size);
  absl::Status ReadFromPack(const std::string& hash, const kiln::state::v1::BlobMeta& meta,
                            absl::FunctionRef<absl::Status(absl::string_view)> fn) const;

  rocksdb::DB* const db_;
  rocksdb::ColumnFamilyHandle* const blobs_;
  rocksdb::ColumnFamilyHandle* const meta_;
  const std::string files_dir_;
  const uint64_t max_blob_bytes_;
  const bool sync_;
  std::atomic<uint64_t> next_upload_{1};
  std::atomic<uint64_t> total_bytes_{0};
  // Shared by uploads finishing a blob and by CopyFilesTo, exclusive for
  // garbage collection: a directory's children cannot vanish between its
  // check and its write, nor a backup's blobs while they are copied.
  absl::Mutex gc_mu_;
  absl::Mutex pack_mu_;
  std::shared_ptr<PackFile> current_pack_ ABSL_GUARDED_BY(pack_mu_);
  uint64_t current_pack_size_ ABSL_GUARDED_BY(pack_mu_) = 0;
  uint64_t next_pack_id_ ABSL_GUARDED_BY(pack_mu_) = 1;
  // Blobs with a meta (or being written) per pack; a pack at zero that is
  // not the current one is deleted.
  absl::flat_hash_map<uint64_t, uint64_t> pack_live_ ABSL_GUARDED_BY(pack_mu_);
  // Small blobs between their "already stored?" check and their meta: a
  // second upload of the same blob waits, then finds it stored, rather
  // than packing it twice.
  absl::flat_hash_set<std::string> packing_ ABSL_GUARDED_BY(pack_mu_);
};

}  // namespace kiln
