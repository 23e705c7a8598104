// kiln-cache-bench: the worker's side of the farm store, timed, for
// bench/run cache. Run inside the mount namespace of the store it works on.
//   upload     sends the closure of --root to the coordinator's farm store
//              exactly as a worker does after a build (FarmUploadingExecutor's
//              UploadClosure over NixLocalStore and gRPC).
//   substitute realises the closure of --root in this (empty) store from the
//              farm store as a worker's Nix does: through the worker's relay
//              on 127.0.0.1 (FarmCacheRelay), with the farm's key trusted.
// Prints name=value lines.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/farm_store_client.h"
#include "common/grpc_util.h"
#include "common/subprocess.h"
#include "worker/farm_cache_relay.h"
#include "worker/farm_uploading_executor.h"
#include "worker/local_store.h"

ABSL_FLAG(std::string, coordinator, "127.0.0.1:7600", "Coordinator address");
ABSL_FLAG(std::string, mode, "upload", "upload or substitute");
ABSL_FLAG(std::string, root, "", "The store path whose closure is sent or fetched");
ABSL_FLAG(std::string, prefix, "upload", "Prefix of the printed names");
ABSL_FLAG(std::string, command, "copy",
          "substitute with `nix copy --from URL` (copy) or as a build does, `nix-store --realise` with the cache as "
          "a substituter (realise)");
ABSL_FLAG(std::string, cache_url, "", "substitute: this binary cache instead of a relay (with --cache_key)");
ABSL_FLAG(std::string, cache_key, "", "The key --cache_url signs with");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string root = absl::GetFlag(FLAGS_root);
  const std::string prefix = absl::GetFlag(FLAGS_prefix);
  kiln::GrpcFarmStoreClient farm(kiln::MakeChannel(absl::GetFlag(FLAGS_coordinator)));
  if (absl::GetFlag(FLAGS_mode) == "upload") {
    kiln::NixLocalStore local("nix", {});
    const absl::Time start = absl::Now();
    absl::StatusOr<kiln::FarmUploadReport> sent = kiln::UploadClosure({root}, local, farm);
    const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    if (!sent.ok()) {
      std::fprintf(stderr, "upload failed: %s\n", std::string(sent.status().message()).c_str());
      return 1;
    }
    std::printf("%s_ms=%.1f\n%s_paths_sent=%zu\n%s_closure_paths=%zu\n%s_nar_bytes=%llu\n", prefix.c_str(), ms,
                prefix.c_str(), sent->paths_sent, prefix.c_str(), sent->closure_paths, prefix.c_str(),
                static_cast<unsigned long long>(sent->nar_bytes_sent));
    return 0;
  }
  absl::StatusOr<std::unique_ptr<kiln::FarmCacheRelay>> relay = kiln::FarmCacheRelay::Start(&farm);
  if (!relay.ok()) {
    std::fprintf(stderr, "relay: %s\n", std::string(relay.status().message()).c_str());
    return 1;
  }
  if (absl::GetFlag(FLAGS_mode) == "relay") {  // For experiments: serve until stdin closes.
    std::printf("%s\n", (*relay)->url().c_str());
    std::fflush(stdout);
    while (std::getchar() != EOF) {}
    return 0;
  }
  // The options a worker's build gets (no other substituter here).
  kiln::NixOptionList options = (*relay)->NixOptionsFor({{"substituters", ""}});
  std::string url = (*relay)->url();
  if (!absl::GetFlag(FLAGS_cache_url).empty()) {
    url = absl::GetFlag(FLAGS_cache_url);
    options = kiln::WithFarmSubstituter({{"substituters", ""}}, url, absl::GetFlag(FLAGS_cache_key));
  }
  kiln::ProcessSpec spec;
  if (absl::GetFlag(FLAGS_command) == "realise") {
    spec.argv = {"nix-store", "--realise", root};
  } else {
    spec.argv = {"nix", "copy", "--extra-experimental-features", "nix-command", "--from", url, root};
  }
  for (const auto& [name, value] : options) spec.argv.insert(spec.argv.end(), {"--option", name, value});
  const absl::Time start = absl::Now();
  absl::StatusOr<kiln::CommandResult> ran = kiln::RunCommand(spec, "", absl::Minutes(30));
  const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  if (!ran.ok() || !ran->exit.Success()) {
    std::fprintf(stderr, "substitution failed: %s\n",
                 ran.ok() ? ran->stderr_data.c_str() : std::string(ran.status().message()).c_str());
    return 1;
  }
  const kiln::FarmCacheRelay::Counts counts = (*relay)->counts();
  std::printf("%s_ms=%.1f\n%s_nars=%llu\n%s_relay_narinfo_ms=%.1f\n%s_relay_nar_ms=%.1f\n", prefix.c_str(), ms,
              prefix.c_str(), static_cast<unsigned long long>(counts.nars), prefix.c_str(),
              absl::ToDoubleMilliseconds(counts.narinfo_time), prefix.c_str(),
              absl::ToDoubleMilliseconds(counts.nar_time));
  return 0;
}
