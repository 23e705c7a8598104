// Writes a file system tree as a NAR (see common/nar.h for the format), the
// way `nix-store --dump` does: entries in byte order, a regular file's
// executable bit kept (no other mode), symlinks not followed, nothing else
// of the tree (owners, times) recorded. Used by workers to send the store
// paths they built to the farm store without a Nix process per path; the
// receiver checks the NAR against the hash Nix recorded, so a tree that
// changed under a valid path is refused there, not stored.
#pragma once

#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// Receives the NAR's bytes in order, in pieces of up to a few hundred KiB.
using NarSink = absl::FunctionRef<absl::Status(absl::string_view bytes)>;

// Dumps `path` (a regular file, a symlink or a directory; anything else is
// an error) into `sink`. Errors from `sink` end the dump and are returned.
absl::Status DumpPathAsNar(const std::string& path, NarSink sink);

}  // namespace kiln
