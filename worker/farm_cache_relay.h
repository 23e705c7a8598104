// FarmCacheRelay: the farm store as a Nix binary cache for this worker's own
// Nix, on 127.0.0.1.
//
// Nix reaches a binary cache over plain HTTP(S) with at most a netrc
// password; it cannot present the worker's mTLS certificate or token, and
// putting a farm credential in Nix's configuration would hand it to every
// build (a derivation can read nix.conf). So the worker serves the cache to
// its Nix itself, on a loopback port, and relays each request over its own
// authenticated channel to the coordinator (FarmStoreClient). Nix verifies
// every narinfo with the farm's public key, which the worker fetches over
// that channel; the relay adds no trust of its own.
//
// NixOptionsFor gives the options that make a build's Nix use it: the relay
// ahead of every other substituter (`Priority: 10` in its nix-cache-info;
// cache.nixos.org says 40), the farm key trusted, and no cached "not
// there" answers (narinfo-cache-negative-ttl = 0), because a path another
// worker builds a minute later must be found then, and `fallback`: a
// substitution the farm fails is built instead.
//
// Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/farm_store_client.h"
#include "worker/worker_metrics.h"

struct mg_context;
struct mg_connection;

namespace kiln {

using NixOptionList = std::vector<std::pair<std::string, std::string>>;

// `options` with the binary cache at `url` first among the substituters and
// `public_key` trusted: an explicit `substituters` (even empty) or
// `trusted-public-keys` is extended, else the `extra-` forms are added.
NixOptionList WithFarmSubstituter(NixOptionList options, const std::string& url, const std::string& public_key);

class FarmCacheRelay {
 public:
  // `farm` and `metrics` (may be null) outlive the relay. Binds 127.0.0.1
  // on a free port.
  static absl::StatusOr<std::unique_ptr<FarmCacheRelay>> Start(FarmStoreClient* farm, WorkerMetrics* metrics = nullptr);
  ~FarmCacheRelay();

  // "http://127.0.0.1:PORT".
  const std::string& url() const { return url_; }

  // `options` made to use the relay (WithFarmSubstituter), once the farm's
  // key is known; until then (the coordinator not reached yet) `options`
  // unchanged — Nix then builds what it would have fetched, no worse than
  // before the farm store. The key is asked for again at most every 5 s
  // until known, and every 10 minutes after (a rotated key).
  NixOptionList NixOptionsFor(const NixOptionList& options) ABSL_LOCKS_EXCLUDED(mu_);

  // Nix 2.8 records a binary cache in its narinfo cache
  // ($XDG_CACHE_HOME/nix/binary-cache-v6.sqlite) the first time it opens
  // it, with an "insert or replace" that gives the cache a new id: two Nix
  // processes opening a new cache at once race, and the loser's narinfo
  // insert fails ("constraint failed"), failing its substitution — two jobs
  // starting together on a fresh worker. So one Nix opens it alone, before
  // any build: `nix_store` asked for a path no one has, through the relay.
  // Best effort (no key yet: nothing to open).
  void PrimeNixCache(const std::string& nix_store, const NixOptionList& options) ABSL_LOCKS_EXCLUDED(mu_);

  // Counts, for metrics and tests.
  struct Counts {
    uint64_t narinfo_hits = 0, narinfo_misses = 0, nars = 0, nar_bytes = 0, errors = 0;
    absl::Duration narinfo_time, nar_time;  // Spent answering, summed over requests.
  };
  Counts counts() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  FarmCacheRelay(FarmStoreClient* farm, WorkerMetrics* metrics) : farm_(farm), metrics_(metrics) {}
  static int Handle(mg_connection* conn, void* self);
  int Serve(mg_connection* conn);

  FarmStoreClient* const farm_;
  WorkerMetrics* const metrics_;
  mg_context* context_ = nullptr;
  std::string address_;
  std::string url_;
  mutable absl::Mutex mu_;
  std::string public_key_ ABSL_GUARDED_BY(mu_);
  absl::Time key_asked_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  Counts counts_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
