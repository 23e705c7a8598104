// NixBuildExecutor: BuildExecutor that runs real Nix as child process groups
// (never through a shell), turns its internal-json log into lines and its
// --json output into the result.
//
// With a FodOracle (the fleet's FOD hash cache) a build goes in steps:
//   1. nix path-info --derivation path:DIR#ATTR     evaluate once
//   2. read the closure's .drv files; look up every FOD in one call
//   3. a FOD the cache knows to be declared wrong (fake or stale hash) fails
//      the build at once, naming the right hash; nothing is built
//   4. a FOD suspected stale (its hash was computed for older inputs) whose
//      output this worker holds is rebuilt (`nix build --rebuild`) to verify
//   5. nix build --keep-going DRV
//   6. every FOD built, and every hash mismatch Nix reported, is recorded
// Without one, a build is the single `nix build path:DIR#ATTR`.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "common/nix_log.h"
#include "common/subprocess.h"
#include "worker/build_executor.h"
#include "worker/fod_oracle.h"

namespace kiln {

struct NixOptions {
  std::string nix_binary = "nix";
  // Passed as `--option NAME VALUE` to every build, e.g. {"substituters", ""}.
  std::vector<std::pair<std::string, std::string>> options;
  // The FOD hash cache; nullptr: builds run without FOD checks.
  FodOracle* fods = nullptr;
};

class NixBuildExecutor final : public BuildExecutor {
 public:
  explicit NixBuildExecutor(NixOptions options) : options_(std::move(options)) {}
  // Cancels what still runs and waits for every build's thread to end.
  ~NixBuildExecutor() override;

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line,
                                DoneCallback on_done) override ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(BuildId id) override ABSL_LOCKS_EXCLUDED(mu_);

  // The argv of the single-step build (exposed for tests: no shell, the
  // installable is one argument after the options).
  std::vector<std::string> BuildArgv(const BuildRequest& request) const;

 private:
  struct Run;
  struct NixRun {
    ExitInfo exit;
    std::string stdout_data;
    NixLogParser parser;
    std::string tail_text;  // Its last lines, for failures without an error.
    bool cancelled = false;
  };

  std::vector<std::string> NixArgv(absl::string_view command) const;
  // Runs one Nix command for `run`, its log going to the build's lines.
  void RunNix(Run& run, const std::vector<std::string>& argv, NixRun& out) ABSL_LOCKS_EXCLUDED(mu_);
  void Execute(const std::shared_ptr<Run>& run) ABSL_LOCKS_EXCLUDED(mu_);
  // Steps 1–6 above.
  void BuildWithFodChecks(Run& run, kiln::v1::BuildResult& result);
  void Line(Run& run, absl::string_view text);

  const NixOptions options_;
  ProcessSupervisor supervisor_;
  absl::Mutex mu_;
  BuildId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<BuildId, std::shared_ptr<Run>> runs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
