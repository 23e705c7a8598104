// LocalStore: what the layers above Nix read of the worker's own Nix store.
// The real one asks Nix (`nix-store --check-validity`) and reads .drv files;
// tests substitute a fake. What the farm store's uploads read (path
// infos, NARs) comes through here too.
//
// Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "common/derivation.h"
#include "common/nar_dump.h"
#include "kiln/v1/store.pb.h"
#include "worker/nix_serve_connection.h"

namespace kiln {

class LocalStore {
 public:
  virtual ~LocalStore() = default;
  // The fixed-output derivations of `drv`'s closure (see common/derivation.h).
  virtual absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& drv) = 0;
  // The valid store paths among `paths` (see common/nix_store_validity.h).
  virtual absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>& paths) = 0;
  // What the store records of every path in the closure of `roots` (valid
  // paths; an invalid root is an error).
  virtual absl::StatusOr<std::vector<kiln::v1::PathInfo>> ClosureInfos(const std::vector<std::string>& roots) = 0;
  // The NAR of a valid path.
  virtual absl::Status DumpNar(const std::string& path, NarSink sink) = 0;
};

// Reads `nix path-info --json` output (Nix 2.8: a JSON array of objects with
// path, narHash, narSize, references, deriver, ca).
absl::StatusOr<std::vector<kiln::v1::PathInfo>> ParsePathInfoJson(absl::string_view json);

class NixLocalStore final : public LocalStore {
 public:
  // `nix_binary` and `options` as NixOptions' (nix-store is found beside it).
  NixLocalStore(const std::string& nix_binary, std::vector<std::pair<std::string, std::string>> options);

  absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& drv) override;
  absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>& paths) override;
  // From a long-lived `nix-store --serve` (worker/nix_serve_connection.h);
  // `nix path-info --json --recursive` if that fails.
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> ClosureInfos(const std::vector<std::string>& roots) override;
  // Written from the file system (common/nar_dump.h): no process per path.
  absl::Status DumpNar(const std::string& path, NarSink sink) override;

 private:
  const std::string nix_binary_;
  const std::string nix_store_binary_;
  const std::unique_ptr<NixServeConnection> serve_;
  const std::vector<std::pair<std::string, std::string>> options_;
};

}  // namespace kiln
