// PublishingExecutor: a BuildExecutor decorator that pushes the image a
// successful build produced, when its job names a push target; any other
// build passes through untouched.
//
// Worker behaviours stack as decorators over one executor interface (as in
// Buildbarn's worker); the composition is worker/main.cc's. The push runs
// after the build, before its result goes on (see AfterBuildExecutor).
//
// Thread-safe.
#pragma once

#include "worker/after_build_executor.h"
#include "worker/image_publisher.h"

namespace kiln {

class PublishingExecutor final : public AfterBuildExecutor {
 public:
  // `inner` must outlive this; `publisher` null: jobs with a push target
  // fail after their build (RESULT_CODE_PUSH_FAILED), saying why.
  PublishingExecutor(BuildExecutor* inner, ImagePublisher* publisher)
      : AfterBuildExecutor(inner), publisher_(publisher) {}

 private:
  bool Applies(const BuildRequest& request) const override { return request.spec.has_push(); }
  // Pushes the image of a successful build into `result` (or fails it).
  void AfterSuccess(const BuildRequest& request, kiln::v1::BuildResult& result,
                    absl::FunctionRef<void(absl::string_view)> say) override;

  ImagePublisher* const publisher_;
};

}  // namespace kiln
