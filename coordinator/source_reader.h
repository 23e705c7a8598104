// SourceReader: reads jobs' source trees back from where submissions put
// them — the CAS, or (without one) the state store — for the blobs an
// assignment carries and the flake directory the result cache keys on.
//
// Keeps the blobs of recently assigned trees (bounded): the jobs of a
// buildset share one. Not thread-safe: the coordinator's strand calls it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "common/source_tree.h"
#include "coordinator/blob_store.h"
#include "coordinator/state_store.h"
#include "kiln/v1/builds.pb.h"
#include "kiln/v1/workers.pb.h"

namespace kiln {

struct SourceReaderLimits {
  size_t max_source_bytes = 64 << 20;           // A tree sent inline.
  uint64_t max_tree_bytes = uint64_t{4} << 30;  // A tree uploaded beforehand.
  // Trees up to this size travel inline with each assignment; a larger one
  // sends its directories only and the worker fetches the files it lacks.
  uint64_t inline_source_bytes = 1 << 20;
};

class SourceReader {
 public:
  // `cas` may be null: blobs are then in `store`.
  SourceReader(StateStore* store, const BlobStore* cas, SourceReaderLimits limits);

  // Puts the blobs of the job's source tree into the assignment: every one,
  // or only its directories for a large uploaded tree.
  absl::Status Attach(const kiln::v1::JobSpec& spec, kiln::v1::Assignment& assign);

  // The digest of the flake's directory within its source (the root when
  // flake_subdir is empty), looking in `inline_blobs` first; nullopt when it
  // cannot be read or is absent.
  std::optional<kiln::v1::Digest> FlakeSubtree(const kiln::v1::SourceRef& source, const BlobLookup& inline_blobs) const;

 private:
  absl::StatusOr<std::string> Read(const std::string& hash) const;

  StateStore* const store_;
  const BlobStore* const cas_;
  const SourceReaderLimits limits_;
  static constexpr size_t kCachedTrees = 64;
  static constexpr size_t kCachedTreeBytes = size_t{256} << 20;
  absl::flat_hash_map<std::string, std::shared_ptr<const std::vector<kiln::v1::Blob>>> tree_blobs_;
  size_t tree_blob_bytes_ = 0;
};

}  // namespace kiln
