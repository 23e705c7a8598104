// ImagePublisher: what a worker does with a built image whose job names a
// push target. RegistryPublisher pushes the docker-archive straight to the
// registry (kiln_push); the bytes never pass through the coordinator.
// Credentials come from the worker's own file and stay on the worker.
#pragma once

#include <set>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "kiln/v1/types.pb.h"
#include "push/image_pusher.h"
#include "worker/worker_metrics.h"

namespace kiln {

class ImagePublisher {
 public:
  virtual ~ImagePublisher() = default;
  // Pushes the image at `output` as `push` says; progress lines go to `log`.
  // Thread-safe.
  virtual absl::StatusOr<kiln::v1::PushResult> Publish(const kiln::v1::PushTarget& push, const std::string& output,
                                                       absl::FunctionRef<void(absl::string_view)> log) = 0;
};

struct RegistryPublisherOptions {
  std::string auth_file;                      // docker-style config.json; empty: anonymous
  std::set<std::string> insecure_registries;  // host:port spoken to over plain HTTP
  std::string ca_file;                        // Empty: the system's CA bundle.
  std::string scratch_dir;
  std::string layer_cache_file;  // diff_id -> compressed digest
  int gzip_level = kDefaultGzipLevel;
  int parallel = 2;  // Threads compressing a layer's members, and threads sending layers.
};

class RegistryPublisher final : public ImagePublisher {
 public:
  // `metrics` may be null.
  RegistryPublisher(RegistryPublisherOptions options, WorkerMetrics* metrics);
  absl::StatusOr<kiln::v1::PushResult> Publish(const kiln::v1::PushTarget& push, const std::string& output,
                                               absl::FunctionRef<void(absl::string_view)> log) override;

 private:
  absl::StatusOr<kiln::v1::PushResult> Push(const kiln::v1::PushTarget& push, const std::string& output,
                                            absl::FunctionRef<void(absl::string_view)> log);

  const RegistryPublisherOptions options_;
  WorkerMetrics* const metrics_;
  LayerCache cache_;
};

}  // namespace kiln
