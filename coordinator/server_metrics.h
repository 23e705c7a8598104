// Metrics the coordinator computes from its parts rather than counts as it
// goes: per-RPC outcomes (a gRPC server interceptor) and the state
// database's size and write stalls (read from RocksDB on each scrape).
#pragma once

#include <memory>
#include <vector>

#include <grpcpp/support/server_interceptor.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "coordinator/rocksdb_state_store.h"

namespace kiln {

// kiln_grpc_server_handled_total{grpc_service,grpc_method,grpc_code} and
// kiln_grpc_server_handling_seconds{grpc_service,grpc_method}, named after
// the usual gRPC server metrics. A method the server does not implement is
// counted as service and method "unknown", so a caller cannot mint labels.
class GrpcServerMetrics final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit GrpcServerMetrics(prometheus::Registry& registry);
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override;

  // Records one finished call (the interceptor's end; public for tests).
  void Record(const char* full_method, grpc::StatusCode code, double seconds);

 private:
  prometheus::Family<prometheus::Counter>& handled_;
  prometheus::Family<prometheus::Histogram>& handling_;
};

// kiln_rocksdb_* gauges and counters, read from the store when scraped.
class StateStoreCollector final : public prometheus::Collectable {
 public:
  explicit StateStoreCollector(const RocksDbStateStore* store) : store_(store) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const RocksDbStateStore* store_;
};

}  // namespace kiln
