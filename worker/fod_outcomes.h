// What Nix's runs mean for a closure's fixed-output derivations: the
// mismatches and verified hashes a build taught (for the FOD cache), the
// reports of `kiln fod-hash`, and the messages that tell a person the fix.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/derivation.h"
#include "common/hash_mismatch.h"
#include "kiln/v1/fod.pb.h"
#include "kiln/v1/types.pb.h"
#include "worker/build_executor.h"

namespace kiln {

// The FODs of one closure, found by .drv path or (Nix <= 2.3 names it in its
// errors) by output path.
class ClosureIndex {
 public:
  explicit ClosureIndex(const std::vector<ClosureFod>& fods);
  const ClosureFod* Find(const std::string& path) const;

 private:
  const std::vector<ClosureFod>& fods_;
  absl::flat_hash_map<std::string, size_t> by_path_;
};

// The valid store paths among those given (see common/nix_store_validity.h).
using ValidPathsQuery =
    std::function<absl::StatusOr<absl::flat_hash_set<std::string>>(const std::vector<std::string>&)>;

// What a finished Nix run says about the closure's FODs: a mismatch for each
// one Nix reported (added to `result`, with `source`), and an outcome for
// each one it built without one whose output Nix now holds (`valid`, asked
// once). When `valid` fails, only the mismatches are returned and `note`
// says why.
std::vector<kiln::v1::FodOutcome> HarvestFods(const ClosureIndex& index, const NixRunReport& nix,
                                              absl::string_view source, const ValidPathsQuery& valid,
                                              kiln::v1::BuildResult& result, std::string* note);

// A FOD fed a whole flake source tree (`src = ./.`): every edit of the
// flake gives it new inputs.
bool TakesWholeFlakeSource(const ClosureFod& fod);

kiln::v1::FodReport ReportOf(const ClosureFod& fod);

// FodTask::MODE_SCAN: every FOD of the closure with the cache's verdict.
void ReportFods(const std::vector<ClosureFod>& fods, const std::vector<kiln::v1::FodVerdict>& verdicts,
                kiln::v1::BuildResult& result);

}  // namespace kiln
