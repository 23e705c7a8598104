#include "coordinator/auth.h"

#include <algorithm>

#include "absl/algorithm/container.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/image_ref.h"
#include "common/tls.h"

namespace kiln {
namespace {

const char* ScopeName(Scope scope) {
  switch (scope) {
    case Scope::kRead: return "read";
    case Scope::kSubmit: return "submit";
    case Scope::kAdmin: return "admin";
    case Scope::kWorker: return "worker";
    case Scope::kBlobs: return "submit";
    case Scope::kCacheRead: return "cache-read";
    case Scope::kCacheWrite: return "cache-write";
  }
  return "?";
}

bool TokenAllows(const TokenGrant& grant, Scope scope) {
  const auto has = [&](const char* s) {
    return std::find(grant.scopes.begin(), grant.scopes.end(), s) != grant.scopes.end();
  };
  // A worker reads the sources and the FOD cache and writes results; that is
  // all its token allows, and no client scope makes one a worker.
  if (has("worker") && (scope == Scope::kWorker || scope == Scope::kRead || scope == Scope::kBlobs ||
                        scope == Scope::kCacheRead || scope == Scope::kCacheWrite)) {
    return true;
  }
  if (has("admin")) return scope != Scope::kWorker;
  switch (scope) {
    case Scope::kCacheRead: return has("cache-read") || has("cache-write") || has("read") || has("submit");
    case Scope::kCacheWrite: return has("cache-write");
    case Scope::kRead: return has("read") || has("submit");
    case Scope::kSubmit:
    case Scope::kBlobs: return has("submit");
    case Scope::kAdmin:
    case Scope::kWorker: return false;
  }
  return false;
}

}  // namespace

absl::Status Authorizer::Refuse(absl::Status status, const char* reason) const {
  if (metrics_ != nullptr) metrics_->AuthRefusals(reason).Increment();
  return status;
}

absl::StatusOr<Caller> Authorizer::Check(const grpc::ServerContextBase& context, Scope scope) const {
  Caller caller;
  // The admin socket: a Unix socket in the state directory.
  if (absl::StartsWith(context.peer(), "unix:")) {
    caller.who = "the local administrator";
    caller.local_admin = true;
    return caller;
  }
  const auto& metadata = context.client_metadata();
  if (auto it = metadata.find("authorization"); it != metadata.end()) {
    absl::string_view value(it->second.data(), it->second.size());
    if (!absl::ConsumePrefix(&value, "Bearer ")) {
      return Refuse(absl::UnauthenticatedError("the authorization header is not 'Bearer TOKEN'"), "bad_token");
    }
    return CheckToken(absl::StripAsciiWhitespace(value), scope);
  }
  caller.worker = PeerCertificateName(context);
  if (!caller.worker.empty()) {
    caller.who = absl::StrCat("worker '", caller.worker, "'");
    if (scope == Scope::kWorker || scope == Scope::kRead || scope == Scope::kBlobs || scope == Scope::kCacheRead ||
        scope == Scope::kCacheWrite) {
      return caller;
    }
    return Refuse(absl::PermissionDeniedError(
                      absl::StrCat(caller.who, " may not do what needs the ", ScopeName(scope), " scope: use a token")),
                  "scope");
  }
  if (!require_tokens_) {
    caller.who = "a loopback client";
    return caller;
  }
  if (scope == Scope::kWorker) {
    // Without TLS anyone on the host could register as any worker: a
    // coordinator that requires tokens wants one of scope `worker`.
    return Refuse(absl::UnauthenticatedError(
                      workers_need_certificate_
                          ? "a worker must present a certificate signed by the farm's CA (--tls-cert)"
                          : "this coordinator requires a token from workers: give the worker --token-file=FILE "
                            "holding one of scope 'worker' ('kiln-coordinator token create --name=NAME "
                            "--scope=worker')"),
                  "no_credentials");
  }
  return Refuse(
      absl::UnauthenticatedError("this coordinator requires a token: set KILN_TOKEN (an administrator makes one with "
                                 "'kiln-coordinator token create --name=NAME --scope=submit')"),
      "no_credentials");
}

absl::StatusOr<Caller> Authorizer::CheckToken(absl::string_view token, Scope scope) const {
  Caller caller;
  absl::StatusOr<TokenGrant> grant = tokens_->Verify(token);
  if (!grant.ok()) return Refuse(grant.status(), "bad_token");
  caller.who = absl::StrCat("token '", grant->name, "'");
  caller.token = *std::move(grant);
  if (!TokenAllows(*caller.token, scope)) {
    return Refuse(absl::PermissionDeniedError(absl::StrCat(caller.who, " has no ", ScopeName(scope), " scope (it has: ",
                                                           absl::StrJoin(caller.token->scopes, ", "), ")")),
                  "scope");
  }
  return caller;
}

absl::Status Authorizer::CheckPush(const Caller& caller, const kiln::v1::PushTarget& push) const {
  if (!caller.token.has_value() || absl::c_linear_search(caller.token->scopes, "admin")) return absl::OkStatus();
  for (const std::string& tag : push.tags()) {
    bool allowed = false;
    for (const std::string& scope : caller.token->scopes) {
      absl::string_view pattern = scope;
      if (absl::ConsumePrefix(&pattern, "push:") && PushPatternMatches(std::string(pattern), push.repository(), tag)) {
        allowed = true;
        break;
      }
    }
    if (!allowed) {
      return Refuse(
          absl::PermissionDeniedError(absl::StrCat(caller.who, " may not push to ", push.repository(), ":", tag)),
          "scope");
    }
  }
  return absl::OkStatus();
}

}  // namespace kiln
