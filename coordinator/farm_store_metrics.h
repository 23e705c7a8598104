// The farm store's Prometheus metrics (kiln_cache_*), on the coordinator's
// registry. Labels have fixed value sets: client is "worker" (the gRPC
// reads a worker's relay and `kiln copy` make) or "http" (the binary cache
// listener); result is "hit" or "miss".
#pragma once

#include <memory>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include "absl/strings/string_view.h"
#include "coordinator/farm_store.h"

namespace kiln {

class FarmStoreMetrics {
 public:
  explicit FarmStoreMetrics(prometheus::Registry& registry);

  prometheus::Gauge& paths;
  prometheus::Gauge& stored_bytes;
  prometheus::Gauge& limit_bytes;
  prometheus::Counter& uploaded_paths;
  prometheus::Counter& uploaded_bytes;
  prometheus::Counter& direct_uploads;
  prometheus::Counter& gc_runs;
  prometheus::Counter& gc_collected_paths;
  prometheus::Counter& gc_collected_bytes;

  // client: worker, http; result: hit, miss.
  prometheus::Counter& NarInfoRequests(absl::string_view client, bool hit);
  // client: worker, http.
  prometheus::Counter& ServedBytes(absl::string_view client);
  // NAR reads sent to object storage (presigned URLs); client: worker, http.
  prometheus::Counter& NarRedirects(absl::string_view client);
  // reason: bad_nar (malformed, or not the size and hash announced),
  // missing_reference, other.
  prometheus::Counter& UploadsRefused(absl::string_view reason);

  // The gauges from the store's stats.
  void Update(const FarmStoreStats& stats);

 private:
  prometheus::Family<prometheus::Counter>& narinfo_family_;
  prometheus::Family<prometheus::Counter>& served_family_;
  prometheus::Family<prometheus::Counter>& refused_family_;
  prometheus::Family<prometheus::Counter>& redirect_family_;
};

}  // namespace kiln
