// BuildExecutor: runs one build of a flake attribute in a local directory.
//
// The worker agent calls Start() for each assignment; the executor reports
// output lines as they come and exactly one result at the end, on a thread of
// its own (callbacks must not block). Implementations: NixBuildExecutor (real
// `nix build`); tests may substitute their own.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "kiln/v1/types.pb.h"

namespace kiln {

struct BuildRequest {
  std::string flake_dir;  // Absolute path of the unpacked flake.
  std::string attr;
  kiln::v1::JobSpec spec;  // Timeouts and the like.
  std::string job_id;      // For what the FOD cache records.
};

class BuildExecutor {
 public:
  using BuildId = uint64_t;
  using LineCallback = absl::AnyInvocable<void(kiln::v1::LogLine line)>;
  using DoneCallback = absl::AnyInvocable<void(kiln::v1::BuildResult result) &&>;

  virtual ~BuildExecutor() = default;

  // Starts a build. On error nothing was started and no callback follows.
  virtual absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) = 0;

  // Stops a build and everything it spawned; its result then says
  // RESULT_CODE_CANCELLED. Unknown or finished ids are ignored.
  virtual void Cancel(BuildId id) = 0;
};

}  // namespace kiln
