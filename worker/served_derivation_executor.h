// ServedDerivationExecutor: the worker's decorator for derivation jobs
// (JobSpec.derivation: one derivation a Nix client sent through `kiln
// serve-nix`). It builds them itself with BuildServedDerivation — inputs
// from the farm store, Nix's build-derivation on the worker's own
// `nix-store --serve --write` — and passes every other request on. Placed
// above the FOD layer (a derivation job is one derivation, checked by the
// gateway) and below the farm-store upload, which sends its outputs. What a
// fixed-output derivation's build finds — its declared hash right, or the
// hash Nix got — goes to the FOD cache, as for any job.
//
// Thread-safe. A build runs on a thread of its own; the destructor cancels
// the builds and waits for their threads.
#pragma once

#include <atomic>
#include <functional>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "worker/build_executor.h"
#include "worker/fod_oracle.h"
#include "worker/served_derivation_build.h"

namespace kiln {

class ServedDerivationExecutor final : public BuildExecutor {
 public:
  // `nix` gives the Nix to build with as each build starts (the farm
  // store's relay first among its substituters). `fods` (may be null: no
  // recording) outlives this.
  ServedDerivationExecutor(BuildExecutor* inner, std::function<ServedDerivationNix()> nix, FodOracle* fods = nullptr)
      : inner_(inner), nix_(std::move(nix)), fods_(fods) {}
  ~ServedDerivationExecutor() override;

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override;
  void Cancel(BuildId id) override;

 private:
  // Ids of builds run here: apart from the inner executor's.
  static constexpr BuildId kOwnIds = BuildId{1} << 62;
  struct Running {
    pid_t pid = -1;
    bool cancelled = false;
  };

  BuildExecutor* const inner_;
  const std::function<ServedDerivationNix()> nix_;
  FodOracle* const fods_;
  absl::Mutex mu_;
  BuildId next_ ABSL_GUARDED_BY(mu_) = kOwnIds;
  absl::flat_hash_map<BuildId, Running> running_ ABSL_GUARDED_BY(mu_);
  int active_ ABSL_GUARDED_BY(mu_) = 0;  // Build threads not yet done.
};

}  // namespace kiln
