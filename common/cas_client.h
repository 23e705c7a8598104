// The client side of the coordinator's CAS: upload a source tree sending only
// what the coordinator lacks, and fetch blobs (verified) for a worker.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "common/source_tree.h"
#include "kiln/v1/cas.grpc.pb.h"

namespace kiln {

struct UploadStats {
  uint64_t blobs_sent = 0;
  uint64_t bytes_sent = 0;     // Blob bytes (not framing).
  uint64_t round_trips = 0;    // FindMissingBlobs calls.
  uint64_t digests_asked = 0;  // Digests sent in those calls.
};

// Makes the coordinator hold `tree`. Asks for the root directory first and
// descends only into directories it lacks, so an unchanged tree costs one
// digest and a one-file change costs that file and its directories. Missing
// files go first, then directories deepest first (the CAS takes a directory
// only when its children are stored).
absl::Status UploadTree(kiln::v1::CasService::Stub& stub, const SourceTree& tree, UploadStats* stats,
                        absl::Duration timeout = absl::Minutes(30));

// Writes the tree under `root` from the CAS into `dest` (an existing, empty
// directory): its directories in one GetTree call, its files in one
// ReadBlobs call (spooled to `spool_dir`, not held in memory), every digest
// verified, nothing written through a link.
absl::Status DownloadTree(kiln::v1::CasService::Stub& stub, const kiln::v1::Digest& root, const std::string& dest,
                          const std::string& spool_dir, const SourceTreeLimits& limits);

// Whether the coordinator holds the whole tree under `root` (one call).
absl::StatusOr<bool> HasDirectory(kiln::v1::CasService::Stub& stub, const kiln::v1::Digest& root);

// Fetches `digests` and calls `on_blob` with each blob's complete bytes once
// they match its digest; a mismatch is an error (DataLoss) and nothing of
// that blob is handed over.
absl::Status FetchBlobs(kiln::v1::CasService::Stub& stub, const std::vector<kiln::v1::Digest>& digests,
                        absl::FunctionRef<absl::Status(const kiln::v1::Digest&, std::string&&)> on_blob,
                        absl::Duration timeout = absl::Minutes(30));

}  // namespace kiln
