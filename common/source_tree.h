// Flake sources as Merkle trees (kiln.v1.Directory): built from a directory
// on the client, checked on the coordinator, materialised on the worker.
// Only what a tree's digest names can be materialised: every blob is checked
// against its digest, and no name or link may lead outside the tree.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kiln/v1/types.pb.h"

namespace kiln {

struct SourceTreeLimits {
  uint64_t max_total_bytes = 64ull << 20;  // Sum of all blobs of one tree.
  uint64_t max_entries = 100000;           // Files, directories and links.
  uint64_t max_entries_per_directory = 20000;
  uint32_t max_depth = 64;
};

// The digest (SHA-256, size) of `data`.
kiln::v1::Digest DigestOf(absl::string_view data);

// OK when `data` has `digest`; otherwise InvalidArgument naming both.
absl::Status VerifyBlob(const kiln::v1::Digest& digest, absl::string_view data);

// A directory's digest: of its serialization, which is canonical for the
// sorted, unique entries this module produces and accepts.
std::string SerializeDirectory(const kiln::v1::Directory& directory);

// A source tree and the blobs it consists of, keyed by hash.
struct SourceTree {
  kiln::v1::Digest root;
  absl::flat_hash_map<std::string, std::string> blobs;
  uint64_t file_count = 0;
};

// Builds the tree of `dir`: regular files (with their executable bit),
// directories and symlinks; `.git` is left out, other file types are skipped.
absl::StatusOr<SourceTree> BuildSourceTree(const std::string& dir, const SourceTreeLimits& limits = {});

// Finds a blob by hash: the data, or nullptr when it is not available.
using BlobLookup = std::function<const std::string*(const std::string& hash)>;

// Walks the tree under `root` and returns the hashes of every blob it needs
// (directories and files, each once, root first). Fails when a blob is
// missing, a directory does not parse or is not canonical, a name or link is
// unsafe, or a limit is passed. File blobs are not re-hashed here.
absl::StatusOr<std::vector<std::string>> ListTreeBlobs(const kiln::v1::Digest& root, const BlobLookup& lookup,
                                                       const SourceTreeLimits& limits = {});

// Writes the tree under `root` into the existing, empty directory `dest`,
// verifying every blob against its digest. On error `dest` may hold a partial
// tree, which the caller removes.
absl::Status MaterializeTree(const kiln::v1::Digest& root, const BlobLookup& lookup, const std::string& dest,
                             const SourceTreeLimits& limits = {});

}  // namespace kiln
