// BlobStore: what the coordinator's job logic needs of the content-addressed
// store — look blobs up, store checked ones, collect garbage — without its
// storage (RocksDB, packs, files). CasStore is the real one; tests may use
// a map.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kiln/state/v1/records.pb.h"
#include "kiln/v1/types.pb.h"

namespace kiln {

class BlobStore {
 public:
  virtual ~BlobStore() = default;
  // NotFound when absent. A directory's meta summarises its whole tree.
  virtual absl::StatusOr<kiln::state::v1::BlobMeta> Meta(const std::string& hash) const = 0;
  virtual bool HasDirectory(const kiln::v1::Digest& digest) const = 0;
  // The whole blob (directories and small files).
  virtual absl::StatusOr<std::string> ReadAll(const std::string& hash) const = 0;
  // Stores a whole blob, verifying it; `*stored` (if given) says whether it
  // was new. A directory is accepted only when its children are present.
  virtual absl::Status Put(const kiln::v1::Digest& digest, absl::string_view data, bool is_directory,
                           bool* stored = nullptr) = 0;
  // Bytes of every stored blob.
  virtual uint64_t total_bytes() const = 0;
  // Deletes blobs not in `keep` stored before `older_than_unix`, oldest
  // first, down to `target_bytes`; the bytes freed.
  virtual absl::StatusOr<uint64_t> CollectGarbage(const absl::flat_hash_set<std::string>& keep, int64_t older_than_unix,
                                                  uint64_t target_bytes) = 0;
};

}  // namespace kiln
