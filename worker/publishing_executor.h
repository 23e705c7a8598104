// PublishingExecutor: a BuildExecutor decorator that pushes the image a
// successful build produced, when its job names a push target; any other
// build passes through untouched.
//
// Worker behaviours stack as decorators over one executor interface (as in
// Buildbarn's worker): NixBuildExecutor runs Nix; this layer publishes; the
// composition is worker/main.cc's. The push runs on the inner executor's
// result thread, before the result goes on, so the build's slot stays taken
// while its image uploads (as a push is part of the job). A cancel that
// arrives meanwhile turns the result into a cancellation once the push
// returns; the push itself is bounded by its own retries.
//
// Thread-safe.
#pragma once

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "worker/build_executor.h"
#include "worker/image_publisher.h"

namespace kiln {

class PublishingExecutor final : public BuildExecutor {
 public:
  // `inner` must outlive this; `publisher` null: jobs with a push target
  // fail after their build (RESULT_CODE_PUSH_FAILED), saying why.
  PublishingExecutor(BuildExecutor* inner, ImagePublisher* publisher) : inner_(inner), publisher_(publisher) {}

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override
      ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(BuildId id) override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // Pushes the image of a successful build into `result` (or fails it).
  void Publish(const kiln::v1::PushTarget& push, kiln::v1::BuildResult& result, LineCallback& on_line);

  // One build with a push target, until its result goes on.
  struct Pushing {
    bool cancelled = false;
    bool done = false;  // Its result went on (possibly before Start returned).
  };

  BuildExecutor* const inner_;
  ImagePublisher* const publisher_;
  absl::Mutex mu_;
  absl::flat_hash_map<BuildId, std::shared_ptr<Pushing>> pushing_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
