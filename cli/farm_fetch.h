// Fetching from the farm store into the local Nix store: what `kiln build
// -o` does with its outputs and what `kiln copy` does with the paths it is
// given.
//
// The CLI reads the farm store over its own authenticated channel (the
// token it already has; any client scope includes `cache-read`), not over
// HTTP: the closure's narinfos are read and their signatures checked here
// against the farm's key, the NARs of the paths the local store lacks are
// written to a temporary directory laid out as a Nix binary cache, and
// stock `nix copy --from file://DIR` adds them — so the local Nix checks
// every NAR's hash and every signature itself (trusting the farm's key:
// passed along for a root or trusted user, from nix.conf's
// trusted-public-keys otherwise).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/farm_store_client.h"

namespace kiln {

struct FarmFetchReport {
  std::vector<std::string> closure;  // Every path of the closures, sorted.
  size_t fetched = 0;                // Paths the local store lacked.
  uint64_t nar_bytes = 0;            // Their NARs (uncompressed).
  std::string public_key;            // The key their signatures were checked with.
};

// Whether this machine has a Nix store the CLI can add to (`nix-store`
// answers). Without one, `-o` downloads files instead.
bool LocalNixStoreUsable();

// Makes `paths` (full store paths) and their closures valid in the local
// store. `progress` gets a line now and then.
absl::StatusOr<FarmFetchReport> FetchFromFarm(FarmStoreClient& farm, const std::vector<std::string>& paths,
                                              const std::function<void(const std::string&)>& progress);

// Makes `link` a symlink to `store_path` that is a root of the local
// store's garbage collector, as `nix build -o` does (an existing symlink is
// replaced; anything else there is refused).
absl::Status AddGcRootLink(const std::string& store_path, const std::string& link);

}  // namespace kiln
