// BuildServedDerivation: one derivation built the way Nix's remote builders
// build it — the serve protocol's build-derivation sent to a `nix-store
// --serve --write` child of the worker — after its inputs are realised in
// the worker's store from the substituters its Nix is given (the farm store
// first, where the gateway put what the client sent). The pieces of the
// gateway's derivation jobs (issue 25) that run on a worker; not yet
// reached from a job.
//
// The child's stdin stays open until the result is read: Nix's server takes
// a hang-up for the client leaving and stops the build. Its stderr (the
// build log) is passed on line by line as it comes.
#pragma once

#include <sys/types.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/serve_protocol.h"

namespace kiln {

struct ServedDerivationNix {
  std::string nix_store = "nix-store";
  // `--option NAME VALUE` for both the realisation and the build.
  std::vector<std::pair<std::string, std::string>> options;
  // Told the build's process (a group leader) as it starts, so that a
  // cancel can stop it; may be unset.
  std::function<void(pid_t)> on_started;
};

// Nix's result. An input that cannot be realised is a MiscFailure saying
// which, as a remote builder without it reports; errors are for the worker's
// own failures (Nix not starting, its protocol broken).
absl::StatusOr<ServeBuildResult> BuildServedDerivation(const ServedDerivationNix& nix, const std::string& drv_path,
                                                       const ServeDerivation& drv, const ServeBuildOptions& options,
                                                       absl::FunctionRef<void(absl::string_view line)> log_line);

}  // namespace kiln
