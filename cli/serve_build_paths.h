// build-paths over the farm: what a client sends when the gateway is its
// store, not only its builder (`nix-store --realise --store ssh://…`, `nix
// build --store ssh://… /nix/store/…drv`). The client has copied the .drv
// files there first (add-to-store-nar); the gateway reads the closure of
// .drv files from the farm store, and builds bottom-up every derivation
// whose outputs the farm lacks — each one through the DerivationBuilder,
// resolved as build-derivation would carry it (so one farm job per
// derivation, and the same FOD check), up to `parallel` at a time, a
// derivation as soon as its inputs are built.
//
// Nix's semantics: the first failure stops what has not started (what has,
// finishes), and is the answer; a path named without outputs that is not a
// .drv must be valid already.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "cli/serve_nix.h"
#include "common/farm_store_client.h"
#include "common/serve_protocol.h"

namespace kiln {

struct BuildPathsLimits {
  size_t max_derivations = 100000;              // In the closure read.
  uint64_t max_drv_bytes = uint64_t{16} << 20;  // One .drv's NAR.
  size_t parallel = 16;                         // Derivations built at once.
};

// `wanted`: Nix's "PATH" or "PATH!OUT1,OUT2" strings. The result: kBuilt
// (or kAlreadyValid when nothing was built) or the first failure, with its
// message. Errors are the gateway's own (the farm unreachable, a .drv that
// cannot be read).
absl::StatusOr<ServeBuildResult> BuildPathsOnFarm(FarmStoreClient& farm, DerivationBuilder& builder,
                                                  const std::vector<std::string>& wanted,
                                                  const ServeBuildOptions& options,
                                                  absl::FunctionRef<void(absl::string_view line)> log,
                                                  const BuildPathsLimits& limits = {});

}  // namespace kiln
