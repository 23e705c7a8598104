// The daemon protocol (what `nix-daemon --stdio` speaks, and Nix's
// `ssh-ng://` stores and remote builders speak to it) over the farm store:
// the second dialect of `kiln serve-nix`, told apart from the serve
// protocol by the client's first number, so one forced command serves both
// `builders = ssh://…` and `builders = ssh-ng://…`.
//
// Announced as version 1.34 (Nix 2.8's daemon), so a client speaks the
// lower of its version and that; clients before 1.32 (Nix 2.4) are
// refused. Served: the handshake and set-options; is-valid-path,
// query-valid-paths, query-path-info and nar-from-path from the farm
// store; add-multiple-to-store and add-to-store-nar into it (framed NARs,
// each checked by the farm store as any upload); build-derivation through
// the same DerivationBuilder as the serve protocol (one farm job, its log
// sent as the daemon's log messages); add-temp-root and ensure-path.
// Anything else gets the daemon's error message naming the operation.
#pragma once

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "cli/serve_nix.h"
#include "common/farm_store_client.h"
#include "common/serve_protocol.h"

namespace kiln {

inline constexpr uint64_t kDaemonMagic1 = 0x6e697863;      // Client's hello.
inline constexpr uint64_t kDaemonMagic2 = 0x6478696f;      // Server's answer.
inline constexpr uint64_t kDaemonProtocolVersion = 0x122;  // 1.34.

// The rest of a session whose client's hello (kDaemonMagic1) was read.
absl::Status RunDaemonSession(ServeReader& in, absl::FunctionRef<absl::Status(absl::string_view)> out,
                              FarmStoreClient& farm, ServeSessionReport& report, DerivationBuilder* builder);

}  // namespace kiln
