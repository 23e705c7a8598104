#include "worker/local_store.h"

#include "worker/nix_store_validity.h"

namespace kiln {

NixLocalStore::NixLocalStore(const std::string& nix_binary, std::vector<std::pair<std::string, std::string>> options)
    : nix_store_binary_(NixStoreBinaryBeside(nix_binary)), options_(std::move(options)) {}

absl::StatusOr<std::vector<ClosureFod>> NixLocalStore::FixedOutputsOfClosure(const std::string& drv) {
  return ::kiln::FixedOutputsOfClosure(drv);
}

absl::StatusOr<absl::flat_hash_set<std::string>> NixLocalStore::ValidPaths(const std::vector<std::string>& paths) {
  return QueryValidPaths(nix_store_binary_, options_, paths);
}

}  // namespace kiln
