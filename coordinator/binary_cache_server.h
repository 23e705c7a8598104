// BinaryCacheServer: the farm store as a standard Nix HTTP binary cache, on
// its own listener (--cache-listen):
//   GET /nix-cache-info        StoreDir, WantMassQuery, Priority
//   GET /HASH.narinfo          the path's narinfo, signed with the farm key
//   GET /nar/FILEHASH.nar.zst  its NAR, zstd-compressed
// A stock Nix client uses it with `--substituters URL --trusted-public-keys
// KEY` (or `nix copy --from URL`). Like every listener of the coordinator it
// serves loopback only while it has no TLS.
//
// The farm's signing key: Nix's secret key format in STATE/cache-key.secret
// (mode 0600), made at first start; never logged.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/narinfo.h"
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

class BinaryCacheServer {
 public:
  // `store` and `metrics` (may be null) outlive the server. `address`:
  // "127.0.0.1:0" and the like.
  static absl::StatusOr<std::unique_ptr<BinaryCacheServer>> Start(const std::string& address, FarmStore* store,
                                                                  SigningKey key, FarmStoreMetrics* metrics = nullptr);
  ~BinaryCacheServer();

  const std::string& address() const { return address_; }  // host:port bound.

 private:
  BinaryCacheServer(FarmStore* store, SigningKey key, FarmStoreMetrics* metrics)
      : store_(store), key_(std::move(key)), metrics_(metrics) {}
  static int Handle(mg_connection* conn, void* self);
  int Serve(mg_connection* conn);

  FarmStore* const store_;
  const SigningKey key_;
  FarmStoreMetrics* const metrics_;
  mg_context* context_ = nullptr;
  std::string address_;
};

}  // namespace kiln
