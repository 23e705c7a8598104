// TokenVerifier: what checking a caller needs of the client tokens — the
// grant a presented token carries. TokenStore (RocksDB) is the real one;
// the Authorizer depends only on this.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

// What a presented token may do.
struct TokenGrant {
  std::string name;
  std::string id;
  std::vector<std::string> scopes;
};

class TokenVerifier {
 public:
  virtual ~TokenVerifier() = default;
  // The grant of a presented token; UNAUTHENTICATED for anything else (the
  // error never repeats the token). Thread-safe.
  virtual absl::StatusOr<TokenGrant> Verify(absl::string_view token) const = 0;
};

}  // namespace kiln
