// NAR (Nix ARchive): the serialisation of one store path that Nix hashes,
// signs and ships (`nix-store --dump`, binary caches). Anything that arrives
// as a NAR from the network is read through NarReader: bounded, checked for
// the structure Nix itself accepts, and hashed as it goes, so nothing is
// stored or unpacked before it is known to be a well-formed archive of the
// size and hash it claims.
//
// The format: every token is a string (a little-endian u64 length, the
// bytes, zero padding to 8 bytes):
//   "nix-archive-1" node
//   node  = "(" "type" ( "regular" ["executable" ""] "contents" BYTES
//                      | "symlink" "target" TARGET
//                      | "directory" ( "entry" "(" "name" NAME "node" node ")" )* ) ")"
// Entry names are strictly ascending (byte order), never empty, ".", "..",
// nor containing '/' or NUL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct NarLimits {
  uint64_t max_nar_bytes = uint64_t{64} << 30;  // The whole archive.
  uint64_t max_entries = uint64_t{4} << 20;     // Files, directories and symlinks.
  size_t max_depth = 256;                       // Directories inside directories.
  size_t max_name_bytes = 255;                  // One entry's name (a file system's limit).
  size_t max_target_bytes = 4095;               // A symlink's target (PATH_MAX - 1).
};

// What a read found: the NAR's size and SHA-256 (raw bytes) over exactly
// its bytes, and what it holds.
struct NarSummary {
  uint64_t nar_bytes = 0;
  std::string sha256;  // 32 bytes.
  uint64_t regular_files = 0, executables = 0, directories = 0, symlinks = 0;
  uint64_t content_bytes = 0;  // Of the regular files.
};

// Reads bytes into `buf` (up to `size`); returns how many (0: the end), or
// an error.
using NarSource = absl::FunctionRef<absl::StatusOr<size_t>(char* buf, size_t size)>;

// Reads exactly one NAR from `source` and checks it; trailing bytes after
// the archive are an error. DATA_LOSS for anything malformed, saying where
// (the entry's path inside the archive) and what.
absl::StatusOr<NarSummary> ReadNar(NarSource source, const NarLimits& limits = {});
// The same for a NAR held in memory.
absl::StatusOr<NarSummary> ReadNar(absl::string_view nar, const NarLimits& limits = {});
// Reads exactly one NAR from the start of `source`, a stream that goes on
// after it (Nix's export format, one NAR after another): no byte past the
// archive's end is read.
absl::StatusOr<NarSummary> ReadNarPrefix(NarSource source, const NarLimits& limits = {});
// The contents of a NAR whose root is one regular file (a .drv), checked as
// ReadNar checks; a file over `max_bytes` is RESOURCE_EXHAUSTED.
absl::StatusOr<std::string> RegularFileOfNar(absl::string_view nar, uint64_t max_bytes);

}  // namespace kiln
