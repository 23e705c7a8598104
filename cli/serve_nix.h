// `kiln serve-nix`: the server side of Nix's serve protocol (what
// `nix-store --serve --write` speaks) over the farm store, on stdin/stdout,
// so it runs as an SSH forced command on a gateway host and stock Nix talks
// to the farm as to any `ssh://` store or remote builder.
//
// Served from the farm store (over the CLI's gRPC channel and token):
// which paths are valid, their path infos (with the farm's signatures),
// their NARs, and closures; and paths a client adds (add-to-store-nar,
// with a token of scope `cache-write`, or import-paths in `nix-store
// --export`'s format from old clients), checked by the farm store as any
// upload; and derivations to build (build-derivation, what Nix's remote
// builders are sent), each a farm job whose log is the session's stderr,
// and derivations of the farm store to build there with their closures
// (build-paths, cli/serve_build_paths.h).
//
// Everything read from the client is bounded (ServeReader's limits) and
// checked; nothing it sends reaches the farm store unverified.
#pragma once

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "common/farm_store_client.h"
#include "common/serve_protocol.h"

namespace kiln {

// What builds a derivation the client sends (build-derivation): the farm
// (FarmDerivationBuilder, a farm job per derivation) or a fake in tests.
class DerivationBuilder {
 public:
  virtual ~DerivationBuilder() = default;
  // Nix's result; the build's log goes to `log` line by line. Errors are
  // the gateway's own (the farm unreachable); the client sees them as a
  // failed build.
  virtual absl::StatusOr<ServeBuildResult> Build(const std::string& drv_path, const ServeDerivation& drv,
                                                 const ServeBuildOptions& options,
                                                 absl::FunctionRef<void(absl::string_view line)> log) = 0;
};

// What the client is told of a build: `built`, or the gateway's own error
// (the farm unreachable, a graph that cannot be read) as a MiscFailure
// saying "kiln: …".
ServeBuildResult ResultForClient(absl::StatusOr<ServeBuildResult> built);

struct ServeSessionReport {
  uint64_t client_version = 0;
  uint64_t commands = 0;
  uint64_t nars_sent = 0, nar_bytes_sent = 0;
  uint64_t paths_added = 0;
  uint64_t derivations_built = 0;
};

// One session: the handshake, then commands until the client closes its
// end (OK) or sends what cannot be served (the error). `out` receives the
// replies; each command's reply is complete when it returns.
// `builder` null: build requests are refused.
absl::Status RunServeSession(ServeReader& in, absl::FunctionRef<absl::Status(absl::string_view)> out,
                             FarmStoreClient& farm, ServeSessionReport* report = nullptr,
                             DerivationBuilder* builder = nullptr);

}  // namespace kiln
