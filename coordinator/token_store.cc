#include "coordinator/token_store.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/digest.h"
#include "common/grpc_util.h"
#include "common/image_ref.h"
#include "coordinator/rocks_status.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr absl::string_view kPrefix = "kiln_";
constexpr size_t kIdHexLength = 16;

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  // OpenSSL's CSPRNG; it fails only without an entropy source, where no
  // token may be made.
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) out.clear();
  return out;
}

std::string SecretHash(const std::string& salt, absl::string_view secret) {
  return absl::HexStringToBytes(Sha256Hex(absl::StrCat(salt, secret)));
}

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(c) && c != '-' && c != '_' && c != '.') return false;
  }
  return true;
}

}  // namespace

absl::Status ValidateTokenScopes(const std::vector<std::string>& scopes) {
  if (scopes.empty())
    return absl::InvalidArgumentError(
        "a token needs at least one scope (submit, read, admin, cache-read, cache-write, push:…)");
  for (const std::string& scope : scopes) {
    if (scope == "submit" || scope == "read" || scope == "admin" || scope == "worker" || scope == "cache-read" ||
        scope == "cache-write") {
      continue;
    }
    absl::string_view pattern = scope;
    if (absl::ConsumePrefix(&pattern, "push:")) {
      if (absl::StatusOr<ImagePattern> p = ParseImagePattern(pattern); !p.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("scope '", scope, "': ", p.status().message()));
      }
      continue;
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown scope '", scope,
        "': scopes are submit, read, admin, worker, cache-read, cache-write and push:REGISTRY/REPOSITORY[:TAG] (globs "
        "allowed, e.g. "
        "push:rg.fr-par.scw.cloud/team/*:testing)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TokenStore>> TokenStore::Open(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family,
                                                             bool sync) {
  auto store = std::unique_ptr<TokenStore>(new TokenStore(db, family, sync));
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), family));
  absl::MutexLock lock(&store->mu_);
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    kiln::state::v1::StoredToken record;
    if (!record.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      return absl::DataLossError(absl::StrCat("unreadable token record ", it->key().ToString()));
    }
    store->by_id_[record.id()] = std::move(record);
  }
  if (!it->status().ok()) return FromRocks(it->status(), "reading tokens");
  return store;
}

kiln::v1::TokenInfo TokenStore::Info(const kiln::state::v1::StoredToken& record) {
  kiln::v1::TokenInfo info;
  info.set_name(record.name());
  info.set_id(record.id());
  *info.mutable_scopes() = record.scopes();
  *info.mutable_created_at() = ToProtoTime(absl::FromUnixSeconds(record.created_unix()));
  return info;
}

absl::StatusOr<kiln::v1::CreateTokenResponse> TokenStore::Create(const std::string& name,
                                                                 const std::vector<std::string>& scopes) {
  if (!ValidName(name)) {
    return absl::InvalidArgumentError("a token's name has 1 to 64 letters, digits, '-', '_' or '.'");
  }
  RETURN_IF_ERROR(ValidateTokenScopes(scopes));
  const std::string id_bytes = RandomBytes(kIdHexLength / 2);
  const std::string salt = RandomBytes(16);
  const std::string secret_bytes = RandomBytes(32);
  if (id_bytes.empty() || salt.empty() || secret_bytes.empty()) return absl::InternalError("no random bytes");
  kiln::state::v1::StoredToken record;
  record.set_id(absl::BytesToHexString(id_bytes));
  record.set_name(name);
  record.set_salt(salt);
  const std::string secret = absl::WebSafeBase64Escape(secret_bytes);
  record.set_secret_sha256(SecretHash(salt, secret));
  for (const std::string& scope : scopes) record.add_scopes(scope);
  record.set_created_unix(absl::ToUnixSeconds(absl::Now()));

  absl::MutexLock lock(&mu_);
  for (const auto& [id, other] : by_id_) {
    if (other.name() == name) {
      return absl::AlreadyExistsError(absl::StrCat("a token named '", name, "' exists; revoke it first"));
    }
  }
  rocksdb::WriteOptions options;
  options.sync = sync_;
  if (absl::Status s = FromRocks(db_->Put(options, family_, record.id(), record.SerializeAsString()), "token write");
      !s.ok()) {
    return s;
  }
  kiln::v1::CreateTokenResponse response;
  *response.mutable_token() = Info(record);
  response.set_secret(absl::StrCat(kPrefix, record.id(), "_", secret));
  by_id_[record.id()] = std::move(record);
  return response;
}

std::vector<kiln::v1::TokenInfo> TokenStore::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<kiln::v1::TokenInfo> out;
  for (const auto& [id, record] : by_id_) out.push_back(Info(record));
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.name() < b.name(); });
  return out;
}

absl::StatusOr<kiln::v1::TokenInfo> TokenStore::Revoke(const std::string& name) {
  absl::MutexLock lock(&mu_);
  for (auto it = by_id_.begin(); it != by_id_.end(); ++it) {
    if (it->second.name() != name) continue;
    rocksdb::WriteOptions options;
    options.sync = sync_;
    RETURN_IF_ERROR(FromRocks(db_->Delete(options, family_, it->first), "token delete"));
    kiln::v1::TokenInfo info = Info(it->second);
    by_id_.erase(it);
    return info;
  }
  return absl::NotFoundError(absl::StrCat("no token named '", name, "'"));
}

absl::StatusOr<TokenGrant> TokenStore::Verify(absl::string_view token) const {
  absl::string_view rest = token;
  const auto refused = [] {
    return absl::UnauthenticatedError("the token is not valid (unknown, revoked or garbled)");
  };
  if (!absl::ConsumePrefix(&rest, kPrefix) || rest.size() <= kIdHexLength + 1 || rest[kIdHexLength] != '_') {
    return refused();
  }
  const std::string id(rest.substr(0, kIdHexLength));
  const absl::string_view secret = rest.substr(kIdHexLength + 1);
  absl::MutexLock lock(&mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return refused();
  const std::string hash = SecretHash(it->second.salt(), secret);
  const std::string& stored = it->second.secret_sha256();
  if (hash.size() != stored.size() || CRYPTO_memcmp(hash.data(), stored.data(), hash.size()) != 0) return refused();
  return TokenGrant{it->second.name(), id, {it->second.scopes().begin(), it->second.scopes().end()}};
}

size_t TokenStore::size() const {
  absl::MutexLock lock(&mu_);
  return by_id_.size();
}

}  // namespace kiln
