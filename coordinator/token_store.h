// TokenStore: the coordinator's client tokens (column family `tokens`).
//
// A token reads `kiln_<id>_<secret>`: the id (16 hex digits) finds the
// record, the secret (32 random bytes, base64url) proves it. Only a salted
// SHA-256 of the secret is stored: the secret is random and long, so a fast
// hash is enough, and nothing stored lets anyone present the token. All
// records are also held in memory (they are few), so checking a token costs
// no read.
#pragma once

#include <rocksdb/db.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/token_verifier.h"
#include "kiln/state/v1/records.pb.h"
#include "kiln/v1/admin.pb.h"

namespace kiln {

// "submit", "read", "admin" or "push:PATTERN"; an error names the bad one.
absl::Status ValidateTokenScopes(const std::vector<std::string>& scopes);

class TokenStore final : public TokenVerifier {
 public:
  // Loads every record; `db` and `family` outlive the store.
  static absl::StatusOr<std::unique_ptr<TokenStore>> Open(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family,
                                                          bool sync);

  // A new token under a name no other token has; the whole token (secret
  // included) is in the answer and nowhere else.
  absl::StatusOr<kiln::v1::CreateTokenResponse> Create(const std::string& name, const std::vector<std::string>& scopes)
      ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<kiln::v1::TokenInfo> List() const ABSL_LOCKS_EXCLUDED(mu_);
  // Deletes the token of that name: it stops working at once.
  absl::StatusOr<kiln::v1::TokenInfo> Revoke(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);
  // The grant of a presented token; UNAUTHENTICATED for anything else (the
  // error never repeats the token).
  absl::StatusOr<TokenGrant> Verify(absl::string_view token) const override ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  TokenStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* family, bool sync) : db_(db), family_(family), sync_(sync) {}
  static kiln::v1::TokenInfo Info(const kiln::state::v1::StoredToken& record);

  rocksdb::DB* const db_;
  rocksdb::ColumnFamilyHandle* const family_;
  const bool sync_;
  mutable absl::Mutex mu_;
  std::map<std::string, kiln::state::v1::StoredToken> by_id_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
