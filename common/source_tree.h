// Flake sources as Merkle trees (kiln.v1.Directory): built from a directory
// on the client, checked on the coordinator, materialised on the worker.
// Only what a tree's digest names can be materialised: every blob is checked
// against its digest, and no name or link may lead outside the tree.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
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
  // Build outputs, not sources: symlinks may point anywhere (a store path's
  // links to other store paths). Materialising never follows a link either way.
  bool allow_external_links = false;
};

// Reads the whole file at `path` into `out`.
absl::Status ReadWholeFile(const std::string& path, std::string& out);

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
  // Every blob's bytes; without `keep_file_data`, directories only.
  absl::flat_hash_map<std::string, std::string> blobs;
  // Without `keep_file_data`: where each file blob's bytes are (a path).
  absl::flat_hash_map<std::string, std::string> file_paths;
  uint64_t file_count = 0;
  uint64_t total_bytes = 0;  // Files and directories.
};

// Remembers file digests by (path, size, mtime, inode), so hashing an
// unchanged tree again reads no file. Kept in one file; not thread-safe.
class DigestCache {
 public:
  // Loads `file` if it exists (an unreadable one is ignored: it is a cache).
  explicit DigestCache(std::string file);
  // The digest of the file at `path` with these stat fields, if known.
  const kiln::v1::Digest* Lookup(const std::string& path, uint64_t size, int64_t mtime_ns, uint64_t inode) const;
  // A file modified in the last two seconds is not remembered: it may still
  // change within the same mtime.
  void Store(const std::string& path, uint64_t size, int64_t mtime_ns, uint64_t inode, const kiln::v1::Digest& digest);
  // Writes the file back (atomically) if anything changed.
  absl::Status Save();
  size_t hits() const { return hits_; }

 private:
  struct Entry {
    uint64_t size;
    int64_t mtime_ns;
    uint64_t inode;
    kiln::v1::Digest digest;
  };
  std::string file_;
  absl::flat_hash_map<std::string, Entry> entries_;
  mutable size_t hits_ = 0;
  bool dirty_ = false;
};

struct BuildSourceTreeOptions {
  // Keep every file's bytes in SourceTree::blobs; otherwise only their
  // paths (an uploader reads just the blobs the other side lacks).
  bool keep_file_data = true;
  DigestCache* digest_cache = nullptr;
  // When set: only these paths, relative to the tree's root with '/', are
  // part of the tree (a git repository's tracked files). A listed directory
  // (a submodule) brings everything under it.
  const absl::flat_hash_set<std::string>* only = nullptr;
};

// Builds the tree of `dir`: regular files (with their executable bit),
// directories and symlinks; `.git` is left out, other file types are skipped.
absl::StatusOr<SourceTree> BuildSourceTree(const std::string& dir, const SourceTreeLimits& limits = {},
                                           const BuildSourceTreeOptions& options = {});

// The files git tracks under `dir` (relative to it), when `dir` is inside a
// git work tree; nullopt when it is not, or git cannot be run (the whole
// directory is then the source, as Nix does for a plain path).
absl::StatusOr<std::optional<absl::flat_hash_set<std::string>>> GitTrackedFiles(const std::string& dir);

// Finds a blob by hash: the data, or nullptr when it is not available.
using BlobLookup = std::function<const std::string*(const std::string& hash)>;

// Walks the tree under `root` and returns the hashes of every blob it needs
// (directories and files, each once, root first). Fails when a blob is
// missing, a directory does not parse or is not canonical, a name or link is
// unsafe, or a limit is passed. File blobs are not re-hashed here.
absl::StatusOr<std::vector<std::string>> ListTreeBlobs(const kiln::v1::Digest& root, const BlobLookup& lookup,
                                                       const SourceTreeLimits& limits = {});

// The digest of the directory at `path` ('/'-separated, relative to `root`;
// "" and "." name the root itself), reading directories through `lookup`.
// NotFound when no such directory is there; DataLoss when a directory on
// the way is missing or does not parse.
absl::StatusOr<kiln::v1::Digest> FindSubtree(const kiln::v1::Digest& root, absl::string_view path,
                                             const BlobLookup& lookup);

// Every directory blob of the tree under `root` (hash, serialized
// Directory), parents before children, each once. Checks what ListTreeBlobs
// checks except that file blobs exist; reads only directory blobs.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> CollectTreeDirectories(
    const kiln::v1::Digest& root, const BlobLookup& lookup, const SourceTreeLimits& limits = {});

// What a directory stands for, computed from its own entries and its
// children's summaries (how a CAS that stores a directory only after its
// children can check a whole tree's limits without walking it).
struct TreeSummary {
  uint64_t bytes = 0;    // All blobs of the tree, the directory's own included.
  uint64_t entries = 0;  // Files, directories and links below it.
  uint32_t depth = 0;    // Directory levels below it (0: no subdirectory).
  // How many levels above this directory its links reach, read lexically;
  // 0: they stay inside. kEscapesTree for absolute or empty targets.
  int32_t link_escape = 0;
  static constexpr int32_t kEscapesTree = 1 << 30;
};

// Levels above its own directory that a link target climbs (see TreeSummary).
int32_t LinkEscape(absl::string_view target);

// Parses a directory blob and checks it alone: it parses, is canonical (the
// bytes are exactly its serialization), names are plain, sorted and unique.
absl::StatusOr<kiln::v1::Directory> ParseCanonicalDirectory(absl::string_view data,
                                                            const SourceTreeLimits& limits = {});

// Whether a whole tree, summarised, is within `limits` and keeps its links
// inside; the error names what is not.
absl::Status CheckTreeSummary(const TreeSummary& summary, const SourceTreeLimits& limits);

// Writes the tree under `root` into the existing, empty directory `dest`,
// verifying every blob against its digest. On error `dest` may hold a partial
// tree, which the caller removes.
absl::Status MaterializeTree(const kiln::v1::Digest& root, const BlobLookup& lookup, const std::string& dest,
                             const SourceTreeLimits& limits = {});

}  // namespace kiln
