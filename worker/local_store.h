// LocalStore: what the layers above Nix read of the worker's own Nix store.
// The real one asks Nix (`nix-store --check-validity`) and reads .drv files;
// tests substitute a fake. The farm store's uploads and fetches will be
// further questions here.
//
// Thread-safe.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "common/derivation.h"

namespace kiln {

class LocalStore {
 public:
  virtual ~LocalStore() = default;
  // The fixed-output derivations of `drv`'s closure (see common/derivation.h).
  virtual absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& drv) = 0;
  // The valid store paths among `paths` (see worker/nix_store_validity.h).
  virtual absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>& paths) = 0;
};

class NixLocalStore final : public LocalStore {
 public:
  // `nix_binary` and `options` as NixOptions' (nix-store is found beside it).
  NixLocalStore(const std::string& nix_binary, std::vector<std::pair<std::string, std::string>> options);

  absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& drv) override;
  absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>& paths) override;

 private:
  const std::string nix_store_binary_;
  const std::vector<std::pair<std::string, std::string>> options_;
};

}  // namespace kiln
