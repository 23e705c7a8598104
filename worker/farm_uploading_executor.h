// Sending what a worker built to the farm store.
//
// UploadClosure sends the part of a closure the farm store lacks: it asks
// for the roots first (held roots have their closures held: one call for an
// unchanged closure), then by store path for the closure (one call), then
// adds the missing paths references
// first — the farm takes a path only once everything it references is
// there — several at once where no path waits on another. A failed attempt
// is retried from the question (paths already sent are not sent again).
//
// FarmUploadingExecutor is the worker's decorator that does it after every
// successful job build, before the result goes on: an upload that still
// fails after its retries makes the job an infrastructure error (retried by
// the coordinator, perhaps elsewhere), never a success whose outputs the
// farm does not have.
//
// Thread-safe.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/after_build_executor.h"
#include "common/farm_store_client.h"
#include "worker/local_store.h"
#include "worker/worker_metrics.h"

namespace kiln {

struct FarmUploadOptions {
  int attempts = 4;
  absl::Duration first_backoff = absl::Seconds(1);  // Doubled per attempt.
  int parallel = 8;                                 // Paths sent at once.
};

struct FarmUploadReport {
  size_t closure_paths = 0;  // In the closure of the roots (0: the roots were held).
  size_t paths_sent = 0;
  uint64_t nar_bytes_sent = 0;
  int attempts = 0;
};

absl::StatusOr<FarmUploadReport> UploadClosure(const std::vector<std::string>& roots, LocalStore& local,
                                               FarmStoreClient& farm, const FarmUploadOptions& options = {});

// Whether a failed upload is worth another attempt: the farm store was
// unreachable, busy, or lost a reference meanwhile; not when the farm
// refused what was sent (it would refuse it again).
bool UploadRetryable(const absl::Status& status);

class FarmUploadingExecutor final : public AfterBuildExecutor {
 public:
  // All must outlive this; `metrics` may be null.
  FarmUploadingExecutor(BuildExecutor* inner, LocalStore* local, FarmStoreClient* farm, FarmUploadOptions options = {},
                        WorkerMetrics* metrics = nullptr)
      : AfterBuildExecutor(inner), local_(local), farm_(farm), options_(options), metrics_(metrics) {}

 private:
  bool Applies(const BuildRequest& request) const override { return request.step == BuildRequest::Step::kFlakeAttr; }
  void AfterSuccess(const BuildRequest& request, kiln::v1::BuildResult& result,
                    absl::FunctionRef<void(absl::string_view)> say) override;

  LocalStore* const local_;
  FarmStoreClient* const farm_;
  const FarmUploadOptions options_;
  WorkerMetrics* const metrics_;
};

}  // namespace kiln
