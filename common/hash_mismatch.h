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
#include "common/derivation.h"
#include "kiln/v1/fod.pb.h"
#include "kiln/v1/types.pb.h"

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

// The line that tells a person what to write.
std::string FixLine(const kiln::v1::HashMismatch& m);

// One mismatch as a person acts on it: Nix's own layout (so what reads
// `specified:`/`got:` keeps working), then where the right hash came from
// (`computed_at`: when the FOD cache learnt it; may be empty).
std::string DescribeMismatch(const kiln::v1::HashMismatch& m, absl::string_view computed_at);

// How a FOD is named to the FOD cache (its key, name, declared hash, .drv,
// algorithm and mode): by workers for a flake's closure and by the gateway
// for a derivation a client sends.
kiln::v1::FodRef RefOf(const ClosureFod& c);

}  // namespace kiln
