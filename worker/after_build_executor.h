// AfterBuildExecutor: the shape of a decorator with work to do after a
// successful build and before its result goes on (pushing its image,
// sending its outputs to the farm store). The work runs on the inner
// executor's result thread, so the build's slot stays taken meanwhile, and
// the job's duration covers it. A cancel that arrives meanwhile turns the
// result into a cancellation once the work returns; the work bounds itself
// (its own retries and deadlines).
//
// Thread-safe.
#pragma once

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "worker/build_executor.h"

namespace kiln {

class AfterBuildExecutor : public BuildExecutor {
 public:
  // `inner` must outlive this.
  explicit AfterBuildExecutor(BuildExecutor* inner) : inner_(inner) {}

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) final
      ABSL_LOCKS_EXCLUDED(mu_);
  void Cancel(BuildId id) final ABSL_LOCKS_EXCLUDED(mu_);

 protected:
  // Whether this layer has work after `request`'s build; the others pass
  // through untouched.
  virtual bool Applies(const BuildRequest& request) const = 0;
  // The work, after a successful build: it may fail `result` (saying why in
  // a line too). `say` writes a "kiln: " line to the job's log.
  virtual void AfterSuccess(const BuildRequest& request, kiln::v1::BuildResult& result,
                            absl::FunctionRef<void(absl::string_view)> say) = 0;

 private:
  // One build this layer works after, until its result goes on.
  struct After {
    bool cancelled = false;
    bool done = false;  // Its result went on (possibly before Start returned).
  };

  BuildExecutor* const inner_;
  absl::Mutex mu_;
  absl::flat_hash_map<BuildId, std::shared_ptr<After>> after_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln
