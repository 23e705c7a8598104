// `kiln fod-hash --write`: putting the right hashes into a flake's .nix files.
//
// Only unambiguous edits are made:
//   - a stale hash literal (in any spelling Nix accepts) that no other FOD of
//     the closure declares is replaced wherever it appears;
//   - a fake hash (`lib.fakeHash`, `fakeSha256`, `outputHash = ""`, an
//     all-zero literal) is replaced when it is the only one and one FOD is
//     fake, or when the nearest `name = "…"`/`pname = "…"` above it names
//     exactly one fake FOD and that FOD has exactly one such occurrence.
// Anything else is left for a person, with the exact edit to make.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kiln {

struct FodHashFix {
  std::string name;      // Derivation name.
  std::string declared;  // SRI, all zeros when fake.
  std::string correct;   // SRI
};

struct HashEdit {
  std::string file;  // Relative to the flake directory.
  int line = 0;      // 1-based.
  std::string before;
  std::string after;
};

struct HashEditPlan {
  std::vector<HashEdit> edits;
  std::vector<std::string> left_to_do;  // One sentence per FOD not edited.
};

// Plans the edits for `fixes` in the .nix files under `flake_dir`. `others`
// are the closure's FODs whose declared hash is right: a literal they share
// is never touched.
absl::StatusOr<HashEditPlan> PlanHashEdits(const std::string& flake_dir, const std::vector<FodHashFix>& fixes,
                                           const std::vector<FodHashFix>& others);

// Writes the planned edits (each file rewritten whole, then renamed over).
absl::Status ApplyHashEdits(const std::string& flake_dir, const HashEditPlan& plan);

}  // namespace kiln
