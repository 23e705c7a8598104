#include "coordinator/farm_store_metrics.h"

#include <string>

namespace kiln {
namespace {

prometheus::Gauge& CacheGauge(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}
prometheus::Counter& CacheCounter(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

}  // namespace

FarmStoreMetrics::FarmStoreMetrics(prometheus::Registry& registry)
    : paths(CacheGauge(registry, "kiln_cache_paths", "Store paths in the farm store.")),
      stored_bytes(CacheGauge(registry, "kiln_cache_stored_bytes", "Bytes of the farm store's compressed NARs.")),
      limit_bytes(CacheGauge(registry, "kiln_cache_limit_bytes",
                             "The farm store's size limit (--cache-max-gb); 0: unbounded.")),
      uploaded_paths(CacheCounter(registry, "kiln_cache_uploaded_paths_total", "Store paths workers added.")),
      uploaded_bytes(CacheCounter(registry, "kiln_cache_uploaded_bytes_total",
                                  "NAR bytes (uncompressed) of the store paths workers added.")),
      direct_uploads(CacheCounter(registry, "kiln_cache_direct_uploads_total",
                                  "Store paths whose NAR a worker put straight into object storage (counted in "
                                  "kiln_cache_uploaded_paths_total too).")),
      gc_runs(CacheCounter(registry, "kiln_cache_gc_runs_total", "Farm store garbage collections that removed paths.")),
      gc_collected_paths(CacheCounter(registry, "kiln_cache_gc_collected_paths_total",
                                      "Store paths the farm store's garbage collection removed.")),
      gc_collected_bytes(CacheCounter(registry, "kiln_cache_gc_collected_bytes_total",
                                      "Compressed NAR bytes the farm store's garbage collection freed.")),
      narinfo_family_(prometheus::BuildCounter()
                          .Name("kiln_cache_narinfo_requests_total")
                          .Help("Narinfo lookups by client kind (worker: over gRPC; http: the binary cache) and "
                                "result (hit, miss).")
                          .Register(registry)),
      served_family_(prometheus::BuildCounter()
                         .Name("kiln_cache_served_bytes_total")
                         .Help("Compressed NAR bytes sent to readers, by client kind.")
                         .Register(registry)),
      refused_family_(prometheus::BuildCounter()
                          .Name("kiln_cache_uploads_refused_total")
                          .Help("Uploads the farm store refused, by reason (bad_nar, missing_reference, other).")
                          .Register(registry)),
      redirect_family_(prometheus::BuildCounter()
                           .Name("kiln_cache_nar_redirects_total")
                           .Help("NAR reads sent to object storage with a presigned URL, by client kind.")
                           .Register(registry)) {
  for (const char* client : {"worker", "http"}) {
    NarInfoRequests(client, true);
    NarInfoRequests(client, false);
    ServedBytes(client);
    NarRedirects(client);
  }
  for (const char* reason : {"bad_nar", "missing_reference", "other"}) UploadsRefused(reason);
}

prometheus::Counter& FarmStoreMetrics::NarInfoRequests(absl::string_view client, bool hit) {
  return narinfo_family_.Add({{"client", std::string(client)}, {"result", hit ? "hit" : "miss"}});
}

prometheus::Counter& FarmStoreMetrics::ServedBytes(absl::string_view client) {
  return served_family_.Add({{"client", std::string(client)}});
}

prometheus::Counter& FarmStoreMetrics::NarRedirects(absl::string_view client) {
  return redirect_family_.Add({{"client", std::string(client)}});
}

prometheus::Counter& FarmStoreMetrics::UploadsRefused(absl::string_view reason) {
  return refused_family_.Add({{"reason", std::string(reason)}});
}

void FarmStoreMetrics::Update(const FarmStoreStats& stats) {
  paths.Set(static_cast<double>(stats.paths));
  stored_bytes.Set(static_cast<double>(stats.file_bytes));
}

}  // namespace kiln
