// Authorizer: who is calling the coordinator and what they may do.
//
// Callers are one of:
//   - a client with a token (`authorization: Bearer kiln_…`), limited to the
//     token's scopes: read < submit < admin, plus push:PATTERN per target;
//   - a worker, by the farm certificate it showed (see common/tls.h);
//   - the local administrator, on the admin socket in the state directory
//     (whoever may open it may do anything);
//   - anyone else: allowed everything only while tokens are not required
//     (a loopback-only coordinator without TLS: the demo and the tests);
//     with --require-tokens but no TLS, still a worker (a loopback
//     coordinator has no other way to know its workers).
// A token that is presented is always checked, required or not.
#pragma once

#include <grpcpp/grpcpp.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/token_verifier.h"
#include "kiln/v1/types.pb.h"

namespace kiln {

enum class Scope {
  kRead,    // Jobs, buildsets, workers, FOD entries, CAS downloads.
  kSubmit,  // Builds (and their uploads), cancelling them.
  kAdmin,   // Tokens, draining workers, editing the FOD cache.
  kWorker,  // A worker's own calls: its stream, FOD lookups and outcomes.
  kBlobs,   // CAS uploads: clients that submit, and workers (outputs).
  // Reading the farm store (narinfos, NARs, its key): Nix clients of the
  // binary cache, `kiln copy`, workers. Every client scope includes it.
  kCacheRead,
  // Adding store paths to the farm store: workers (what they build), and
  // tokens with `cache-write` (an SSH gateway's, taking a Nix client's
  // inputs). Like Nix's trusted-users: what such a caller adds, the farm
  // serves under its signature. No other client scope includes it.
  kCacheWrite,
};

struct Caller {
  std::string who;  // For messages: "token 'ci'", "worker 'fr-par-1'", …
  std::optional<TokenGrant> token;
  std::string worker;  // The certificate's name, for workers.
  bool local_admin = false;
};

class Authorizer {
 public:
  // `metrics` may be null (tests).
  // `workers_need_certificate`: the coordinator serves TLS.
  Authorizer(const TokenVerifier* tokens, bool require_tokens, bool workers_need_certificate,
             CoordinatorMetrics* metrics)
      : tokens_(tokens),
        require_tokens_(require_tokens),
        workers_need_certificate_(workers_need_certificate),
        metrics_(metrics) {}

  // The caller, if it may do `scope`; UNAUTHENTICATED (no or bad
  // credentials) or PERMISSION_DENIED (not in its scopes) otherwise, with a
  // message that says which and what to do.
  absl::StatusOr<Caller> Check(const grpc::ServerContextBase& context, Scope scope) const;
  // The same for a token given outside gRPC (the binary cache's HTTP Basic
  // password).
  absl::StatusOr<Caller> CheckToken(absl::string_view token, Scope scope) const;

  // Every tag of `push` against the caller's push:PATTERN scopes (callers
  // without a token: nothing to check).
  absl::Status CheckPush(const Caller& caller, const kiln::v1::PushTarget& push) const;

  bool require_tokens() const { return require_tokens_; }

 private:
  absl::Status Refuse(absl::Status status, const char* reason) const;

  const TokenVerifier* const tokens_;
  const bool require_tokens_;
  const bool workers_need_certificate_;
  CoordinatorMetrics* const metrics_;
};

// `auth` null (services used in-process: tests, the offline token command):
// the caller is local and may do anything.
inline absl::StatusOr<Caller> Authorize(const Authorizer* auth, const grpc::ServerContextBase& context, Scope scope) {
  if (auth == nullptr) return Caller{"the local administrator", std::nullopt, "", true};
  return auth->Check(context, scope);
}

// Authorizer::CheckPush, or nothing to check without an authorizer.
inline absl::Status AuthorizePush(const Authorizer* auth, const Caller& caller, const kiln::v1::PushTarget& push) {
  return auth == nullptr ? absl::OkStatus() : auth->CheckPush(caller, push);
}

}  // namespace kiln
