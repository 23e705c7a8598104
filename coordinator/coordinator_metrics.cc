#include "coordinator/coordinator_metrics.h"

#include <string>

namespace kiln {
namespace {

prometheus::Gauge& MakeGauge(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}
prometheus::Counter& MakeCounter(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

// Build and wait times run from seconds to hours.
const prometheus::Histogram::BucketBoundaries& DurationBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{0.05, 0.1, 0.25, 0.5, 1,   2.5,  5,    10,
                                                                     30,   60,  120,  300, 600, 1800, 3600, 7200};
  return *b;
}

}  // namespace

CoordinatorMetrics::CoordinatorMetrics(std::shared_ptr<prometheus::Registry> registry)
    : jobs_running(MakeGauge(*registry, "kiln_jobs_running", "Jobs assigned to a worker and not finished.")),
      slots(MakeGauge(*registry, "kiln_farm_slots", "Build slots offered by connected workers.")),
      slots_used(MakeGauge(*registry, "kiln_farm_slots_used", "Build slots of connected workers in use.")),
      dispatch_duration(
          prometheus::BuildHistogram()
              .Name("kiln_dispatch_duration_seconds")
              .Help("Time of one scheduling round: decide, store, send the assignments.")
              .Register(*registry)
              .Add({}, prometheus::Histogram::BucketBoundaries{0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                               0.005, 0.01, 0.05, 0.1, 0.5, 1})),
      jobs_submitted(MakeCounter(*registry, "kiln_jobs_submitted_total", "Jobs accepted.")),
      submissions_rejected(MakeCounter(*registry, "kiln_submissions_rejected_total",
                                       "Build submissions refused (invalid input or storage error).")),
      state_write_errors(
          MakeCounter(*registry, "kiln_state_write_errors_total", "Failed writes to the coordinator's state store.")),
      state_writable(MakeGauge(*registry, "kiln_state_writable",
                               "1 while the state store takes writes; 0 after a write failed (a full disk) until "
                               "it resumes: no new work is taken meanwhile.")),
      build_duration(prometheus::BuildHistogram()
                         .Name("kiln_build_duration_seconds")
                         .Help("Time from a job's start on a worker to its result.")
                         .Register(*registry)
                         .Add({}, DurationBuckets())),
      queue_wait(prometheus::BuildHistogram()
                     .Name("kiln_job_queue_wait_seconds")
                     .Help("Time from submission (or requeue) to assignment.")
                     .Register(*registry)
                     .Add({}, DurationBuckets())),
      cas_uploaded_bytes(MakeCounter(*registry, "kiln_cas_uploaded_bytes_total", "Blob bytes stored by uploads.")),
      cas_uploaded_blobs(MakeCounter(*registry, "kiln_cas_uploaded_blobs_total", "Blobs stored by uploads.")),
      cas_skipped_bytes(MakeCounter(*registry, "kiln_cas_skipped_bytes_total",
                                    "Blob bytes clients asked about and did not send: already stored.")),
      cas_downloaded_bytes(MakeCounter(*registry, "kiln_cas_downloaded_bytes_total", "Blob bytes sent to readers.")),
      cas_rejected_blobs(MakeCounter(*registry, "kiln_cas_rejected_blobs_total",
                                     "Uploaded blobs refused (wrong digest, missing children, limits).")),
      cas_gc_runs(MakeCounter(*registry, "kiln_cas_gc_runs_total", "CAS garbage collections.")),
      cas_gc_freed_bytes(
          MakeCounter(*registry, "kiln_cas_gc_freed_bytes_total", "Blob bytes deleted by CAS garbage collection.")),
      cas_stored_bytes(MakeGauge(*registry, "kiln_cas_stored_bytes", "Bytes of all blobs in the CAS.")),
      fod_builds_avoided(MakeCounter(*registry, "kiln_fod_builds_avoided_total",
                                     "FOD builds not run: the cache knew their declared hash was wrong.")),
      fod_build_seconds_saved(
          MakeCounter(*registry, "kiln_fod_build_seconds_saved_total",
                      "Estimated build time of the FOD builds avoided (their recorded durations).")),
      fod_recorded(MakeCounter(*registry, "kiln_fod_outcomes_recorded_total",
                               "FOD build outcomes (verified or mismatched hashes) reported by workers.")),
      fod_entries(MakeGauge(*registry, "kiln_fod_cache_entries", "FOD keys in the hash cache (RocksDB's estimate).")),
      stored_log_bytes(MakeGauge(*registry, "kiln_job_logs_stored_bytes",
                                 "Compressed logs of finished jobs in the state database.")),
      logs_expired(MakeCounter(*registry, "kiln_job_logs_expired_total",
                               "Finished jobs' logs removed by the retention limit (--log-retention-kb).")),
      push_bytes(MakeCounter(*registry, "kiln_push_bytes_total",
                             "Image bytes workers uploaded to registries, from job results.")),
      registry_(std::move(registry)),
      finished_family_(prometheus::BuildCounter()
                           .Name("kiln_jobs_finished_total")
                           .Help("Jobs that reached a final state, by result.")
                           .Register(*registry_)),
      requeue_family_(prometheus::BuildCounter()
                          .Name("kiln_job_requeues_total")
                          .Help("Jobs put back in the queue, by reason.")
                          .Register(*registry_)),
      queued_family_(prometheus::BuildGauge()
                         .Name("kiln_jobs_queued")
                         .Help("Jobs waiting for a worker, by priority class and system.")
                         .Register(*registry_)),
      workers_family_(prometheus::BuildGauge()
                          .Name("kiln_workers")
                          .Help("Workers known to the coordinator, by state.")
                          .Register(*registry_)),
      result_cache_family_(prometheus::BuildCounter()
                               .Name("kiln_result_cache_lookups_total")
                               .Help("Targets looked up in the result cache at submission, by outcome.")
                               .Register(*registry_)),
      fod_lookup_family_(prometheus::BuildCounter()
                             .Name("kiln_fod_lookups_total")
                             .Help("FODs of build closures looked up in the hash cache, by verdict.")
                             .Register(*registry_)),
      auth_refusal_family_(prometheus::BuildCounter()
                               .Name("kiln_auth_refusals_total")
                               .Help("Calls refused for their credentials or scopes, by reason.")
                               .Register(*registry_)),
      push_blobs_family_(prometheus::BuildCounter()
                             .Name("kiln_push_blobs_total")
                             .Help("Image blobs (layers and configs) of finished pushes, by what the registry needed.")
                             .Register(*registry_)) {
  // Pre-create every label value so the series exist from the first scrape.
  for (auto r : {"succeeded", "failed", "cancelled"}) JobsFinished(r);
  for (auto r : {"worker_lost", "lease_expired", "infra_error"}) Requeues(r);
  for (auto s : {"connected", "draining", "disconnected"}) Workers(s);
  for (auto r : {"hit", "miss", "bypassed"}) ResultCacheLookups(r);
  for (auto r : {"hit", "stale_caught", "suspect", "nondeterministic", "miss"}) FodLookups(r);
  for (auto r : {"no_credentials", "bad_token", "scope"}) AuthRefusals(r);
  for (auto r : {"pushed", "skipped", "mounted"}) PushBlobs(r);
}

prometheus::Gauge& CoordinatorMetrics::JobsQueued(absl::string_view priority, absl::string_view system) {
  return queued_family_.Add({{"priority", std::string(priority)}, {"system", std::string(system)}});
}

prometheus::Gauge& CoordinatorMetrics::Workers(absl::string_view state) {
  return workers_family_.Add({{"state", std::string(state)}});
}

prometheus::Counter& CoordinatorMetrics::JobsFinished(absl::string_view result) {
  return finished_family_.Add({{"result", std::string(result)}});
}

prometheus::Counter& CoordinatorMetrics::Requeues(absl::string_view reason) {
  return requeue_family_.Add({{"reason", std::string(reason)}});
}

prometheus::Counter& CoordinatorMetrics::ResultCacheLookups(absl::string_view result) {
  return result_cache_family_.Add({{"result", std::string(result)}});
}

prometheus::Counter& CoordinatorMetrics::FodLookups(absl::string_view result) {
  return fod_lookup_family_.Add({{"result", std::string(result)}});
}

prometheus::Counter& CoordinatorMetrics::AuthRefusals(absl::string_view reason) {
  return auth_refusal_family_.Add({{"reason", std::string(reason)}});
}

prometheus::Counter& CoordinatorMetrics::PushBlobs(absl::string_view result) {
  return push_blobs_family_.Add({{"result", std::string(result)}});
}

}  // namespace kiln
