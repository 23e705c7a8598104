// Which store paths the local Nix store holds, asked of Nix.
//
// A directory at a store path does not make it a store path Nix knows:
// Nix 2.8 leaves the output of a fixed-output derivation whose hash check
// failed on disk, unregistered, and an interrupted build leaves its partial
// output. Only the store's database says what is valid, so every "is this
// output here?" decision goes through QueryValidPaths.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

// `nix-store` next to `nix_binary` (the same directory, or PATH when it has
// none).
std::string NixStoreBinaryBeside(const std::string& nix_binary);

// Reads `nix-store --check-validity --print-invalid` output: the invalid
// paths, one per line. Every one must be one of `asked`; the rest of `asked`
// are the valid ones, which are returned.
absl::StatusOr<absl::flat_hash_set<std::string>> ValidPathsFromInvalidList(const std::vector<std::string>& asked,
                                                                           absl::string_view printed);

// The valid paths among `paths`, in one call of `nix_store_binary`
// (`--option NAME VALUE` for each of `options`). No call for no paths.
absl::StatusOr<absl::flat_hash_set<std::string>> QueryValidPaths(
    const std::string& nix_store_binary, const std::vector<std::pair<std::string, std::string>>& options,
    const std::vector<std::string>& paths);

}  // namespace kiln
