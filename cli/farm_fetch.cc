#include "cli/farm_fetch.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "cli/cli.h"
#include "cli/client.h"
#include "common/exit_codes.h"
#include "common/narinfo.h"
#include "common/parallel_for.h"
#include "common/nix_store_validity.h"
#include "common/status_macros.h"
#include "common/subprocess.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMaxClosurePaths = 1 << 20;
// Narinfos and NARs read at once: small transfers are latency-bound.
constexpr int kParallel = 16;

std::string Trimmed(const std::string& s, size_t max = 2000) {
  return std::string(absl::StripAsciiWhitespace(s.substr(0, max)));
}

absl::StatusOr<CommandResult> RunNix(const std::vector<std::string>& argv, absl::Duration timeout) {
  ProcessSpec spec;
  spec.argv = argv;
  absl::StatusOr<CommandResult> ran = RunCommand(spec, "", timeout, 16 << 20);
  if (!ran.ok()) return WithContext(ran.status(), "running ", argv[0]);
  if (!ran->exit.Success()) {
    return absl::FailedPreconditionError(absl::StrCat(argv[0], " ", argv.size() > 1 ? argv[1] : "", " failed (",
                                                      ran->exit.ToString(), "): ", Trimmed(ran->stderr_data)));
  }
  return ran;
}

// Writes a file whole, or says why not.
absl::Status WriteFile(const fs::path& path, absl::string_view text) {
  std::ofstream out(path, std::ios::binary);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// A temporary directory, removed when it goes.
struct ScratchDir {
  fs::path path;
  ~ScratchDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

}  // namespace

bool LocalNixStoreUsable() {
  ProcessSpec spec;
  spec.argv = {"nix-store", "--version"};
  absl::StatusOr<CommandResult> ran = RunCommand(spec, "", absl::Seconds(20));
  return ran.ok() && ran->exit.Success() && fs::is_directory("/nix/store");
}

absl::StatusOr<FarmFetchReport> FetchFromFarm(FarmStoreClient& farm, const std::vector<std::string>& paths,
                                              const std::function<void(const std::string&)>& progress) {
  FarmFetchReport report;
  ASSIGN_OR_RETURN(report.public_key, farm.PublicKey(), "asking the farm store for its key");
  const std::vector<std::string> keys = {report.public_key};

  // 1. The closure, from the farm's narinfos, each signature checked: level
  // by level, each level's narinfos read at once.
  std::vector<NarInfo> infos;
  absl::flat_hash_set<std::string> seen;
  std::vector<std::string> level;
  const auto enqueue = [&](std::string path) -> absl::Status {
    if (!absl::StartsWith(path, "/")) path = absl::StrCat("/nix/store/", path);
    if (!seen.insert(path).second) return absl::OkStatus();
    if (seen.size() > kMaxClosurePaths) return absl::ResourceExhaustedError("a closure of more than 1M paths");
    level.push_back(std::move(path));
    return absl::OkStatus();
  };
  for (const std::string& p : paths) RETURN_IF_ERROR(enqueue(p));
  while (!level.empty()) {
    std::vector<NarInfo> read(level.size());
    RETURN_IF_ERROR(ParallelFor(level.size(), kParallel, [&](size_t i) -> absl::Status {
      const std::string& path = level[i];
      ASSIGN_OR_RETURN(std::string hash_part, StorePathHashPart(path));
      absl::StatusOr<std::string> text = farm.NarInfo(hash_part);
      if (absl::IsNotFound(text.status())) {
        return absl::NotFoundError(
            absl::StrCat(path, " is not in the farm store (built by a worker with --farm-store=false, or collected)"));
      }
      if (!text.ok()) return WithContext(text.status(), "reading the narinfo of ", path);
      ASSIGN_OR_RETURN(read[i], ParseNarInfo(*text), "the farm's narinfo of ", path);
      if (read[i].store_path != path) {
        return absl::DataLossError(absl::StrCat("the farm answered for ", path, " with ", read[i].store_path));
      }
      bool signed_by_farm = false;
      for (const std::string& sig : read[i].sigs) signed_by_farm |= VerifySignature(read[i].Fingerprint(), sig, keys);
      if (!signed_by_farm) {
        return absl::DataLossError(absl::StrCat("the farm's narinfo of ", path, " has no valid signature by ",
                                                report.public_key.substr(0, report.public_key.find(':'))));
      }
      return absl::OkStatus();
    }));
    level.clear();
    for (NarInfo& info : read) {
      for (const std::string& r : info.references) RETURN_IF_ERROR(enqueue(r));
      infos.push_back(std::move(info));
    }
  }
  for (const NarInfo& info : infos) report.closure.push_back(info.store_path);
  std::sort(report.closure.begin(), report.closure.end());

  // 2. What the local store lacks.
  ASSIGN_OR_RETURN(absl::flat_hash_set<std::string> valid, QueryValidPaths("nix-store", {}, report.closure));
  if (valid.size() == report.closure.size()) return report;

  // 3. A binary cache in a directory: every narinfo (Nix walks the closure
  // through them), and the NARs of the paths to fetch.
  ScratchDir dir;
  char tmpl[] = "/tmp/kiln-fetch-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return absl::InternalError("cannot make a temporary directory");
  dir.path = tmpl;
  std::error_code ec;
  fs::create_directories(dir.path / "nar", ec);
  RETURN_IF_ERROR(WriteFile(dir.path / "nix-cache-info", "StoreDir: /nix/store\n"));
  std::vector<const NarInfo*> fetch;
  for (const NarInfo& info : infos) {
    ASSIGN_OR_RETURN(std::string hash_part, StorePathHashPart(info.store_path));
    RETURN_IF_ERROR(WriteFile(dir.path / absl::StrCat(hash_part, ".narinfo"), info.Render()));
    if (valid.contains(info.store_path)) continue;
    if (!absl::StartsWith(info.url, "nar/") || info.url.find('/', 4) != std::string::npos || info.url.size() > 200) {
      return absl::DataLossError(absl::StrCat("the farm's narinfo of ", info.store_path, " names a NAR at ", info.url));
    }
    fetch.push_back(&info);
  }
  std::vector<std::string> wanted;
  for (const NarInfo* info : fetch) wanted.push_back(info->store_path);
  absl::Mutex mu;
  RETURN_IF_ERROR(ParallelFor(fetch.size(), kParallel, [&](size_t i) -> absl::Status {
    const NarInfo& info = *fetch[i];
    std::ofstream nar(dir.path / info.url, std::ios::binary);
    absl::Status fetched = farm.FetchNar(info.url.substr(4), [&](absl::string_view bytes) -> absl::Status {
      nar.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      return nar ? absl::OkStatus() : absl::InternalError("cannot write a NAR to " + dir.path.string());
    });
    nar.close();
    if (!fetched.ok()) return WithContext(fetched, "fetching ", info.store_path);
    absl::MutexLock lock(&mu);
    ++report.fetched;
    report.nar_bytes += info.nar_size;
    if (progress && report.fetched % 500 == 0) {
      progress(absl::StrFormat("fetched %d of %d path(s) from the farm store", report.fetched, fetch.size()));
    }
    return absl::OkStatus();
  }));

  // 4. Nix adds them, checking hashes and signatures.
  std::vector<std::string> argv = {"nix",
                                   "copy",
                                   "--extra-experimental-features",
                                   "nix-command",
                                   "--from",
                                   absl::StrCat("file://", dir.path.string()),
                                   "--option",
                                   "extra-trusted-public-keys",
                                   report.public_key,
                                   "--"};
  argv.insert(argv.end(), wanted.begin(), wanted.end());
  RETURN_IF_ERROR(RunNix(argv, absl::Hours(1)).status());
  return report;
}

absl::Status AddGcRootLink(const std::string& store_path, const std::string& link) {
  const fs::path dest = fs::absolute(link);
  std::error_code ec;
  const fs::file_status st = fs::symlink_status(dest, ec);
  if (fs::exists(st) && !fs::is_symlink(st)) {
    return absl::AlreadyExistsError(absl::StrCat(dest.string(), " exists and is not a symlink; remove it first"));
  }
  // nix-store makes the symlink and registers it with the collector.
  return RunNix({"nix-store", "--realise", store_path, "--add-root", dest.string()}, absl::Minutes(10)).status();
}

int RunCopyCommand(const CliOptions& options, const std::vector<std::string>& paths) {
  for (const std::string& p : paths) {
    if (!StorePathHashPart(p).ok() || !absl::StartsWith(p, "/nix/store/")) {
      Err(absl::StrCat("error: '", p.substr(0, 200), "' is not a store path (/nix/store/HASH-NAME)"));
      return kExitUsage;
    }
  }
  if (!LocalNixStoreUsable()) {
    Err("error: no Nix store here to copy into (nix-store is not on PATH, or /nix/store is absent)");
    return kExitUsage;
  }
  GrpcFarmStoreClient farm(Channel(options));
  absl::StatusOr<FarmFetchReport> fetched =
      FetchFromFarm(farm, paths, [&](const std::string& line) { Err(absl::StrCat("kiln: ", line)); });
  if (!fetched.ok()) {
    const absl::Status& s = fetched.status();
    Err(absl::StrCat("error: ", Describe(s)));
    return absl::IsNotFound(s) || absl::IsDataLoss(s) ? kExitBuildFailed : ExitCodeFor(s);
  }
  if (options.json) {
    nlohmann::json out = {{"requested", paths},
                          {"closure", fetched->closure},
                          {"fetched", fetched->fetched},
                          {"narBytes", fetched->nar_bytes},
                          {"publicKey", fetched->public_key}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    Err(absl::StrFormat("kiln: %d of %d path(s) fetched from the farm store (%.1f MiB)", fetched->fetched,
                        fetched->closure.size(), static_cast<double>(fetched->nar_bytes) / (1 << 20)));
  }
  return kExitOk;
}

}  // namespace kiln
