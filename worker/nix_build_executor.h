// NixBuildExecutor: BuildExecutor that runs
//   nix build --json --no-link --log-format internal-json path:DIR#ATTR
// as a child process group (never through a shell), turns its internal-json
// log into lines, and its --json output into the result.
#pragma once

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "common/subprocess.h"
#include "worker/build_executor.h"

namespace kiln {

struct NixOptions {
  std::string nix_binary = "nix";
  // Passed as `--option NAME VALUE` to every build, e.g. {"substituters", ""}.
  std::vector<std::pair<std::string, std::string>> options;
};

class NixBuildExecutor final : public BuildExecutor {
 public:
  explicit NixBuildExecutor(NixOptions options) : options_(std::move(options)) {}

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line,
                                DoneCallback on_done) override ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(BuildId id) override ABSL_LOCKS_EXCLUDED(mu_);

  // The argv for a build (exposed for tests: no shell, the installable is one
  // argument).
  std::vector<std::string> BuildArgv(const BuildRequest& request) const;

 private:
  const NixOptions options_;
  ProcessSupervisor supervisor_;
  absl::Mutex mu_;
  absl::flat_hash_set<BuildId> cancelled_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
