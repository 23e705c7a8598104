// The walking-skeleton source transport: a flake directory travels as one
// deterministic gzip-compressed tar (sorted entries, zero times and owners),
// so the same tree always gives the same bytes and the same digest.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct ArchiveLimits {
  uint64_t max_archive_bytes = 64ull << 20;     // Compressed.
  uint64_t max_unpacked_bytes = 1ull << 30;     // Sum of file sizes.
  uint64_t max_entries = 100000;
};

// Packs the directory tree at `dir` (regular files with their executable bit,
// directories, symlinks as links). `.git` directories are left out.
absl::StatusOr<std::string> PackDirectory(const std::string& dir,
                                          const ArchiveLimits& limits = {});

// Unpacks `archive` into the existing, empty directory `dest`. Refuses absolute
// names, `..` components, links that lead outside `dest` and anything past the
// limits; on error `dest` may hold a partial tree the caller removes.
absl::Status UnpackArchive(absl::string_view archive, const std::string& dest,
                           const ArchiveLimits& limits = {});

}  // namespace kiln
