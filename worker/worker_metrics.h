// The worker's Prometheus metrics (served on --metrics-listen).
#pragma once

#include <memory>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/strings/string_view.h"

namespace kiln {

class WorkerMetrics {
 public:
  explicit WorkerMetrics(std::shared_ptr<prometheus::Registry> registry);

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  prometheus::Gauge& builds_running;
  prometheus::Gauge& slots;
  prometheus::Gauge& coordinator_connected;
  prometheus::Counter& reconnects;
  prometheus::Counter& log_lines_dropped;
  prometheus::Histogram& build_duration;
  // The Nix store's file system, as sent in each heartbeat.
  prometheus::Gauge& store_free_bytes;
  prometheus::Gauge& store_size_bytes;
  prometheus::Gauge& work_dir_free_bytes;

  prometheus::Counter& push_bytes;
  // The farm store: what this worker sent it, and what its Nix read of it
  // through the relay.
  prometheus::Counter& farm_uploaded_paths;
  prometheus::Counter& farm_uploaded_bytes;
  prometheus::Counter& farm_upload_failures;
  prometheus::Counter& farm_substituted_bytes;
  // result: hit, miss, error (the farm unreachable).
  prometheus::Counter& FarmNarInfoRequests(absl::string_view result);
  prometheus::Histogram& push_duration;

  // result: succeeded, failed, cancelled, infra_error.
  prometheus::Counter& BuildsFinished(absl::string_view result);
  // result: pushed, skipped (the registry had it), mounted (from another
  // repository of the registry).
  prometheus::Counter& PushedBlobs(absl::string_view result);
  // code: unauthorized, denied, not_found, invalid, unavailable, other.
  prometheus::Counter& PushFailures(absl::string_view code);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& finished_family_;
  prometheus::Family<prometheus::Counter>& blobs_family_;
  prometheus::Family<prometheus::Counter>& push_failures_family_;
  prometheus::Family<prometheus::Counter>& farm_narinfo_family_;
};

}  // namespace kiln
