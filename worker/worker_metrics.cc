#include "worker/worker_metrics.h"

#include <string>

namespace kiln {

WorkerMetrics::WorkerMetrics(std::shared_ptr<prometheus::Registry> registry)
    : builds_running(prometheus::BuildGauge()
                         .Name("kiln_worker_builds_running")
                         .Help("Builds this worker is running.")
                         .Register(*registry)
                         .Add({})),
      slots(prometheus::BuildGauge()
                .Name("kiln_worker_slots")
                .Help("Builds this worker runs at once at most (--max-jobs).")
                .Register(*registry)
                .Add({})),
      coordinator_connected(prometheus::BuildGauge()
                                .Name("kiln_worker_coordinator_connected")
                                .Help("1 while registered with the coordinator, else 0.")
                                .Register(*registry)
                                .Add({})),
      reconnects(prometheus::BuildCounter()
                     .Name("kiln_worker_reconnects_total")
                     .Help("Streams to the coordinator opened after the first.")
                     .Register(*registry)
                     .Add({})),
      log_lines_dropped(prometheus::BuildCounter()
                            .Name("kiln_worker_log_lines_dropped_total")
                            .Help("Build log lines not sent because the stream was full or down.")
                            .Register(*registry)
                            .Add({})),
      build_duration(prometheus::BuildHistogram()
                         .Name("kiln_worker_build_duration_seconds")
                         .Help("Wall time of nix build runs on this worker.")
                         .Register(*registry)
                         .Add({}, prometheus::Histogram::BucketBoundaries{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                                          120, 300, 600, 1800, 3600, 7200})),
      store_free_bytes(prometheus::BuildGauge()
                           .Name("kiln_worker_store_free_bytes")
                           .Help("Bytes available to builds on the Nix store's file system.")
                           .Register(*registry)
                           .Add({})),
      store_size_bytes(prometheus::BuildGauge()
                           .Name("kiln_worker_store_size_bytes")
                           .Help("Size of the Nix store's file system.")
                           .Register(*registry)
                           .Add({})),
      work_dir_free_bytes(prometheus::BuildGauge()
                              .Name("kiln_worker_work_dir_free_bytes")
                              .Help("Bytes available on the work directory's file system (source cache, checkouts).")
                              .Register(*registry)
                              .Add({})),
      push_bytes(prometheus::BuildCounter()
                     .Name("kiln_worker_push_bytes_total")
                     .Help("Compressed blob bytes this worker uploaded to registries.")
                     .Register(*registry)
                     .Add({})),
      farm_uploaded_paths(prometheus::BuildCounter()
                              .Name("kiln_worker_farm_uploaded_paths_total")
                              .Help("Store paths this worker sent to the farm store.")
                              .Register(*registry)
                              .Add({})),
      farm_uploaded_bytes(prometheus::BuildCounter()
                              .Name("kiln_worker_farm_uploaded_bytes_total")
                              .Help("NAR bytes (uncompressed) this worker sent to the farm store.")
                              .Register(*registry)
                              .Add({})),
      farm_upload_failures(prometheus::BuildCounter()
                               .Name("kiln_worker_farm_upload_failures_total")
                               .Help("Builds whose outputs could not be sent to the farm store after retries "
                                     "(each reported as an infrastructure error).")
                               .Register(*registry)
                               .Add({})),
      farm_substituted_bytes(prometheus::BuildCounter()
                                 .Name("kiln_worker_farm_substituted_bytes_total")
                                 .Help("Compressed NAR bytes this worker's Nix fetched from the farm store.")
                                 .Register(*registry)
                                 .Add({})),
      push_duration(prometheus::BuildHistogram()
                        .Name("kiln_worker_push_duration_seconds")
                        .Help("Wall time of image pushes (successful ones).")
                        .Register(*registry)
                        .Add({}, prometheus::Histogram::BucketBoundaries{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                                                                         300, 600, 1800})),
      registry_(std::move(registry)),
      finished_family_(prometheus::BuildCounter()
                           .Name("kiln_worker_builds_finished_total")
                           .Help("Builds finished on this worker, by result.")
                           .Register(*registry_)),
      blobs_family_(prometheus::BuildCounter()
                        .Name("kiln_worker_pushed_blobs_total")
                        .Help("Blobs of pushed images, by what happened to them.")
                        .Register(*registry_)),
      push_failures_family_(prometheus::BuildCounter()
                                .Name("kiln_worker_push_failures_total")
                                .Help("Image pushes that failed, by the kind of registry error.")
                                .Register(*registry_)),
      farm_narinfo_family_(prometheus::BuildCounter()
                               .Name("kiln_worker_farm_narinfo_requests_total")
                               .Help("Narinfo lookups this worker's Nix made of the farm store, by result (hit, "
                                     "miss, error).")
                               .Register(*registry_)) {
  for (auto r : {"hit", "miss", "error"}) FarmNarInfoRequests(r);
  for (auto r : {"succeeded", "failed", "cancelled", "infra_error", "timed_out"}) BuildsFinished(r);
  for (auto r : {"pushed", "skipped", "mounted"}) PushedBlobs(r);
  for (auto c : {"unauthorized", "denied", "not_found", "invalid", "unavailable", "other"}) PushFailures(c);
}

prometheus::Counter& WorkerMetrics::PushedBlobs(absl::string_view result) {
  return blobs_family_.Add({{"result", std::string(result)}});
}

prometheus::Counter& WorkerMetrics::PushFailures(absl::string_view code) {
  return push_failures_family_.Add({{"code", std::string(code)}});
}

prometheus::Counter& WorkerMetrics::BuildsFinished(absl::string_view result) {
  return finished_family_.Add({{"result", std::string(result)}});
}

prometheus::Counter& WorkerMetrics::FarmNarInfoRequests(absl::string_view result) {
  return farm_narinfo_family_.Add({{"result", std::string(result)}});
}

}  // namespace kiln
