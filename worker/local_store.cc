#include "worker/local_store.h"

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "common/nix_store_validity.h"

namespace kiln {

absl::StatusOr<std::vector<kiln::v1::PathInfo>> ParsePathInfoJson(absl::string_view json) {
  const nlohmann::json parsed = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_array()) return absl::DataLossError("nix path-info --json printed no JSON array");
  std::vector<kiln::v1::PathInfo> out;
  out.reserve(parsed.size());
  for (const nlohmann::json& entry : parsed) {
    const auto path = entry.find("path");
    if (!entry.is_object() || path == entry.end() || !path->is_string()) {
      return absl::DataLossError("nix path-info --json: an entry without a path");
    }
    kiln::v1::PathInfo& info = out.emplace_back();
    info.set_store_path(path->get<std::string>());
    if (entry.contains("valid") && entry["valid"].is_boolean() && !entry["valid"].get<bool>()) {
      return absl::NotFoundError(absl::StrCat(info.store_path(), " is not valid in the local store"));
    }
    const auto hash = entry.find("narHash");
    const auto size = entry.find("narSize");
    if (hash == entry.end() || !hash->is_string() || size == entry.end() || !size->is_number_unsigned()) {
      return absl::DataLossError(absl::StrCat("nix path-info --json: no narHash or narSize for ", info.store_path()));
    }
    info.set_nar_hash(hash->get<std::string>());
    info.set_nar_size(size->get<uint64_t>());
    if (const auto refs = entry.find("references"); refs != entry.end() && refs->is_array()) {
      for (const nlohmann::json& r : *refs) {
        if (r.is_string()) info.add_references(r.get<std::string>());
      }
    }
    if (const auto d = entry.find("deriver"); d != entry.end() && d->is_string())
      info.set_deriver(d->get<std::string>());
    if (const auto ca = entry.find("ca"); ca != entry.end() && ca->is_string()) info.set_ca(ca->get<std::string>());
  }
  return out;
}

NixLocalStore::NixLocalStore(const std::string& nix_binary, std::vector<std::pair<std::string, std::string>> options)
    : nix_binary_(nix_binary),
      nix_store_binary_(NixStoreBinaryBeside(nix_binary)),
      serve_(std::make_unique<NixServeConnection>(nix_store_binary_, options)),
      options_(std::move(options)) {}

absl::StatusOr<std::vector<ClosureFod>> NixLocalStore::FixedOutputsOfClosure(const std::string& drv) {
  return ::kiln::FixedOutputsOfClosure(drv);
}

absl::StatusOr<absl::flat_hash_set<std::string>> NixLocalStore::ValidPaths(const std::vector<std::string>& paths) {
  return QueryValidPaths(nix_store_binary_, options_, paths);
}

absl::StatusOr<std::vector<kiln::v1::PathInfo>> NixLocalStore::ClosureInfos(const std::vector<std::string>& roots) {
  if (roots.empty()) return std::vector<kiln::v1::PathInfo>{};
  if (absl::StatusOr<std::vector<kiln::v1::PathInfo>> served = serve_->ClosureInfos(roots); served.ok()) {
    return served;
  }
  ProcessSpec spec;
  spec.argv = {nix_binary_, "path-info", "--extra-experimental-features", "nix-command", "--json", "--recursive"};
  for (const auto& [name, value] : options_) spec.argv.insert(spec.argv.end(), {"--option", name, value});
  spec.argv.push_back("--");
  spec.argv.insert(spec.argv.end(), roots.begin(), roots.end());
  absl::StatusOr<CommandResult> run = RunCommand(spec, "", absl::Minutes(5));
  if (!run.ok()) return run.status();
  if (!run->exit.Success()) {
    std::string err = run->stderr_data;
    while (!err.empty() && err.back() == '\n') err.pop_back();
    return absl::InternalError(absl::StrCat("nix path-info failed (", run->exit.ToString(), "): ", err));
  }
  return ParsePathInfoJson(run->stdout_data);
}

absl::Status NixLocalStore::DumpNar(const std::string& path, NarSink sink) {
  if (!absl::StartsWith(path, "/nix/store/"))
    return absl::InvalidArgumentError(absl::StrCat(path, " is no store path"));
  return DumpPathAsNar(path, sink);
}

}  // namespace kiln
