// BuildExecutor: runs one build of a flake attribute in a local directory.
//
// The worker agent calls Start() for each assignment; the executor reports
// output lines as they come and exactly one result at the end, on a thread of
// its own (callbacks must not block). Worker behaviours stack as decorators
// over this interface, composed in worker/main.cc: NixBuildExecutor runs Nix
// (and nothing else), FodCheckingExecutor checks fixed-output derivations
// against the fleet's FOD cache around it, PublishingExecutor pushes images
// on top. The layers above Nix ask it for steps besides the job's build
// (BuildRequest::step).
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kiln/v1/types.pb.h"

namespace kiln {

// The derivation a build started before it was known is to build (see
// BuildRequest::hand_over): the build's Nix starts at once and waits, so
// that evaluating and checking the job, which decide the derivation, do not
// pay Nix's start-up one after the other. Whoever made it must Give or
// Withdraw exactly once; the executor's Cancel withdraws it too.
class DerivationHandOver {
 public:
  // Builds `drv_path` (a store path ending in .drv).
  void Give(std::string drv_path) ABSL_LOCKS_EXCLUDED(mu_);
  // Nothing to build: the waiting build ends, cancelled.
  void Withdraw() ABSL_LOCKS_EXCLUDED(mu_);
  // For the executor: waits for either; nullopt when withdrawn.
  std::optional<std::string> Await() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Mutex mu_;
  bool decided_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<std::string> drv_path_ ABSL_GUARDED_BY(mu_);
};

// What a Nix run said besides its result, for the layers that read Nix's
// messages (the FOD checks find hash mismatches and verified hashes there).
struct NixRunReport {
  std::vector<std::string> errors;  // Nix's error messages, each whole.
  struct Built {
    std::string drv_path;
    double seconds = 0;
  };
  std::vector<Built> built;  // The derivation builds that ran to their end.
};

struct BuildRequest {
  std::string flake_dir;  // Absolute path of the unpacked flake.
  std::string attr;
  kiln::v1::JobSpec spec;  // Timeouts and the like.
  std::string job_id;      // For what the FOD cache records.

  enum class Step {
    kFlakeAttr,    // Build flake_dir#attr (or, with hand_over, the derivation given).
    kEvaluate,     // Only evaluate flake_dir#attr: the result's drv_path, nothing built.
    kDerivations,  // Build drv_paths.
  };
  Step step = Step::kFlakeAttr;
  std::vector<std::string> drv_paths;             // kDerivations.
  bool rebuild = false;                           // Build outputs already held again and compare (`--rebuild`).
  bool keep_going = false;                        // Build what can be built when a derivation fails.
  std::shared_ptr<DerivationHandOver> hand_over;  // kFlakeAttr: the derivation comes later.
  // Filled before the result is reported, when set.
  std::shared_ptr<NixRunReport> report;
  // Runs on the derivation slots of this running build (a step of the same
  // job, run while it waits); 0: a share of its own.
  uint64_t share_slots_of = 0;
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
