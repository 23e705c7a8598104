// BinaryCacheServer: the farm store as a standard Nix HTTP binary cache, on
// its own listener (--cache-listen):
//   GET /nix-cache-info        StoreDir, WantMassQuery, Priority
//   GET /HASH.narinfo          the path's narinfo, signed with the farm key
//   GET /nar/FILEHASH.nar.zst  its NAR, zstd-compressed
// A stock Nix client uses it with `--substituters URL --trusted-public-keys
// KEY` (or `nix copy --from URL`). It serves loopback only (civetweb's TLS
// does not work with OpenSSL 3 here: see common/metrics_http.cc); off the
// host, a TLS-terminating proxy forwards to it. With TLS or --require-tokens
// every request needs a token of the `cache-read` scope (or any client
// scope) as its HTTP Basic password: how a stock Nix authenticates, from
// the file its `netrc-file` setting names (the user name is not read).
//
// The farm's signing key: Nix's secret key format in STATE/cache-key.secret
// (mode 0600), made at first start; never logged.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/narinfo.h"
#include "coordinator/auth.h"
#include "coordinator/farm_store.h"
#include "coordinator/farm_store_metrics.h"

struct mg_context;
struct mg_connection;

namespace kiln {

// The key in `state_dir`, made (named `name`) when there is none.
absl::StatusOr<SigningKey> LoadOrCreateCacheKey(const std::string& state_dir, const std::string& name = "kiln-farm-1");
// A new key replacing the one in `state_dir` (rotation: clients need the new
// public key in trusted-public-keys; nothing stored is re-signed, as
// narinfos are signed when served).
absl::StatusOr<SigningKey> CreateCacheKey(const std::string& state_dir, const std::string& name);

struct BinaryCacheAccess {
  // Set: every request needs a token (HTTP Basic password) that may read
  // the farm store.
  const Authorizer* auth = nullptr;
};

class BinaryCacheServer {
 public:
  // `store` and `metrics` (may be null) outlive the server. `address`:
  // "127.0.0.1:0" and the like.
  static absl::StatusOr<std::unique_ptr<BinaryCacheServer>> Start(const std::string& address, FarmStore* store,
                                                                  SigningKey key, FarmStoreMetrics* metrics = nullptr,
                                                                  BinaryCacheAccess access = {});
  ~BinaryCacheServer();

  const std::string& address() const { return address_; }  // host:port bound.

 private:
  BinaryCacheServer(FarmStore* store, SigningKey key, FarmStoreMetrics* metrics, const Authorizer* auth)
      : store_(store), key_(std::move(key)), metrics_(metrics), auth_(auth) {}
  // Whether the request carries a token that may read; answers 401 if not.
  bool Authorized(mg_connection* conn);
  static int Handle(mg_connection* conn, void* self);
  int Serve(mg_connection* conn);

  FarmStore* const store_;
  const SigningKey key_;
  FarmStoreMetrics* const metrics_;
  const Authorizer* const auth_;
  mg_context* context_ = nullptr;
  std::string address_;
};

}  // namespace kiln
