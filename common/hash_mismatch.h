// Reading Nix's "hash mismatch in fixed-output derivation" errors.
//
// `nix build` exits 1 for any failure, so what went wrong is read from the
// text. Known forms (the test data has one file of each):
//   Nix 2.4–2.35   names the .drv; `specified:` / `got:`, SRI (older 2.x
//                  releases print sha256:base32)
//   Nix ≤ 2.3      names the output path; `wanted:` / `got:`, sha256:base32
//   Lix            as Nix 2.4+, plus `likely URL:`, `expected path:` and
//                  `got path:` lines
// Colours are ignored; every hash comes back as SRI.
#pragma once

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kiln {

struct HashMismatch {
  std::string path;  // The .drv, or the output path for Nix ≤ 2.3.
  bool path_is_drv = false;
  std::string specified;  // SRI
  std::string got;        // SRI
  std::string url;        // Lix's "likely URL", when given.
};

// Every mismatch in `text`, in order (`--keep-going` reports several).
// Mismatches whose hashes cannot be read are skipped.
std::vector<HashMismatch> ParseHashMismatches(absl::string_view text);

}  // namespace kiln
