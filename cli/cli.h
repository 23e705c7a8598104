// The `kiln` command line: the commands as library functions, so main() only
// parses flags and tests link the same code.
//
// Exit codes (stable, for CI):
//   0  every build succeeded
//   1  a build failed or was cancelled (Nix's error is printed)
//   2  bad usage or input refused by the coordinator
//   3  the coordinator could not be reached or failed
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include <vector>

#include "common/exit_codes.h"

namespace grpc {
class ChannelCredentials;
}  // namespace grpc

namespace kiln {

struct CliOptions {
  std::string coordinator;  // host:port
  // TLS to the coordinator (common/tls.h); null: plaintext.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string token;  // Sent with every call when set (see LoadClientToken).
  bool json = false;
  std::string system = "x86_64-linux";
  bool quiet = false;                    // No build log, only the result.
  bool print_build_logs = false;         // -L: the full log under the terminal view too.
  std::string priority = "interactive";  // A class name the coordinator knows.
  int64_t timeout_seconds = 0;           // Whole job; 0: the coordinator's default.
  int64_t max_silent_time_seconds = 0;   // Without log output; 0: no limit.
  int watch_retry_seconds = 120;
  bool detach = false;           // build: submit, print the job ids, do not wait.
  bool rebuild = false;          // build: bypass the coordinator's result cache.
  bool all_flakes = false;       // build: every flake.nix of the repository.
  std::string attr = "default";  // build --all-flakes: the attribute of each.
  std::string targets_file;      // build --file: a kiln.json listing targets.
  std::string out_link;          // build -o: the outputs here.
  // build --out-link-mode: "store" (-o realises the outputs in the local
  // Nix store from the farm store and links them, as nix build does),
  // "files" (downloads their files), or "auto": store where there is one.
  std::string out_link_mode = "auto";
  // build --push REGISTRY/REPOSITORY[:TAG] and --tag: the worker pushes the image.
  std::string push;
  std::vector<std::string> tags;
  bool oci_manifest = false;  // build --manifest-format=oci
  // build --label: only workers with these labels may take the builds.
  std::map<std::string, std::string> labels;
};

// `kiln build INSTALLABLE...`: uploads each flake, submits, streams the logs,
// prints the output paths (or a JSON array like `nix build --json`).
int RunBuildCommand(const CliOptions& options, const std::vector<std::string>& installables);

// A name for the flake at `flake_dir` (absolute) and `attr` that survives
// edits: its path below the enclosing git repository's root, else its
// absolute path ("services/api#oci-image").
std::string LocalityKey(const std::string& flake_dir, const std::string& attr);

// The installables ("DIR#attr", DIR absolute) a kiln.json lists:
// {"targets": [{"flake": "services/a", "attr": "oci-image"}, …]} or the bare
// array; flake directories relative to the file, attr "default" if absent.
absl::StatusOr<std::vector<std::string>> TargetsFromFile(const std::string& file);

// `kiln serve-nix`: Nix's serve protocol on stdin/stdout over the farm
// store (see cli/serve_nix.h), as an SSH forced command.
int RunServeNixCommand(const CliOptions& options);

// `kiln status ID`: a job, or every job of a buildset (ids "b…").
int RunStatusCommand(const CliOptions& options, const std::string& id);

// `kiln log JOB [-f]`: the job's build log on stdout: what the coordinator
// kept so far, or with -f everything until the job ends (then the exit code
// is the job's: 0 succeeded, 1 otherwise).
int RunLogCommand(const CliOptions& options, const std::string& job_id, bool follow);

// `kiln history [--limit=N]`: the most recent buildsets, newest first, with
// their results and durations.
int RunHistoryCommand(const CliOptions& options, int limit);

// `kiln cancel ID`: a job, or every unfinished job of a buildset.
int RunCancelCommand(const CliOptions& options, const std::string& id);

// `kiln workers`, `kiln workers drain NAME`, `kiln workers undrain NAME`.
int RunWorkersCommand(const CliOptions& options, const std::vector<std::string>& args);

// `kiln copy PATH...`: the paths' closures from the farm store into the
// local Nix store (see cli/farm_fetch.h).
int RunCopyCommand(const CliOptions& options, const std::vector<std::string>& paths);

// `kiln fod-hash PATH#ATTR [--write]`: the right hash of every FOD of the
// closure whose declared hash is fake or stale, from the FOD cache or
// computed on the farm (one job per FOD); --write edits the .nix files.
int RunFodHashCommand(const CliOptions& options, const std::vector<std::string>& args, bool write);

// `kiln fod list|show|forget|export|import`: the FOD cache's entries.
int RunFodCommand(const CliOptions& options, const std::vector<std::string>& args, const std::string& name);

// The client token: $KILN_TOKEN, else the file $XDG_CONFIG_HOME/kiln/token
// (~/.config/kiln/token), which must not be readable by group or others.
// "" when there is none.
absl::StatusOr<std::string> LoadClientToken();

}  // namespace kiln
