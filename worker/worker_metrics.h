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

  // result: succeeded, failed, cancelled, infra_error.
  prometheus::Counter& BuildsFinished(absl::string_view result);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& finished_family_;
};

}  // namespace kiln
