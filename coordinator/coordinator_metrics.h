// The coordinator's Prometheus metrics. Names follow Prometheus conventions
// (base units, `_total` counters); labels have small fixed value sets, never
// a job id or anything a user typed.
#pragma once

#include <memory>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/strings/string_view.h"

namespace kiln {

class CoordinatorMetrics {
 public:
  explicit CoordinatorMetrics(std::shared_ptr<prometheus::Registry> registry);

  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

  prometheus::Gauge& jobs_running;
  prometheus::Gauge& slots;
  prometheus::Gauge& slots_used;
  prometheus::Histogram& dispatch_duration;
  prometheus::Counter& jobs_submitted;
  prometheus::Counter& submissions_rejected;
  prometheus::Counter& state_write_errors;
  prometheus::Gauge& state_writable;
  prometheus::Histogram& build_duration;
  prometheus::Histogram& queue_wait;
  // Content-addressed store: what clients and workers sent and fetched, and
  // what they did not need to send because it was stored already.
  prometheus::Counter& cas_uploaded_bytes;
  prometheus::Counter& cas_uploaded_blobs;
  prometheus::Counter& cas_skipped_bytes;
  prometheus::Counter& cas_downloaded_bytes;
  prometheus::Counter& cas_rejected_blobs;
  prometheus::Counter& cas_gc_runs;
  prometheus::Counter& cas_gc_freed_bytes;
  prometheus::Gauge& cas_stored_bytes;
  prometheus::Counter& fod_builds_avoided;
  prometheus::Counter& fod_build_seconds_saved;
  prometheus::Counter& fod_recorded;
  prometheus::Gauge& fod_entries;
  // Finished jobs' compressed logs in the store, and logs removed by the
  // retention limit.
  prometheus::Gauge& stored_log_bytes;
  prometheus::Counter& logs_expired;
  // Image pushes reported by workers in job results.
  prometheus::Counter& push_bytes;

  // result: succeeded, failed, cancelled.
  prometheus::Counter& JobsFinished(absl::string_view result);
  // reason: worker_lost, lease_expired, infra_error.
  prometheus::Counter& Requeues(absl::string_view reason);
  // priority: interactive, ci, batch; system: a system some worker offers,
  // or "other" (the label never carries arbitrary user input).
  prometheus::Gauge& JobsQueued(absl::string_view priority, absl::string_view system);
  // state: connected, draining, disconnected.
  prometheus::Gauge& Workers(absl::string_view state);
  // result: hit, miss, bypassed (--rebuild).
  prometheus::Counter& ResultCacheLookups(absl::string_view result);
  // result: hit (declared hash right), stale_caught (declared hash fake or
  // stale, the right one known), suspect (unknown inputs, hash computed for
  // older ones), nondeterministic, miss.
  prometheus::Counter& FodLookups(absl::string_view result);
  // reason: no_credentials, bad_token (unknown, revoked, garbled), scope.
  prometheus::Counter& AuthRefusals(absl::string_view reason);
  // result: pushed, skipped (the registry had it), mounted.
  prometheus::Counter& PushBlobs(absl::string_view result);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& finished_family_;
  prometheus::Family<prometheus::Counter>& requeue_family_;
  prometheus::Family<prometheus::Gauge>& queued_family_;
  prometheus::Family<prometheus::Gauge>& workers_family_;
  prometheus::Family<prometheus::Counter>& result_cache_family_;
  prometheus::Family<prometheus::Counter>& fod_lookup_family_;
  prometheus::Family<prometheus::Counter>& auth_refusal_family_;
  prometheus::Family<prometheus::Counter>& push_blobs_family_;
};

}  // namespace kiln
