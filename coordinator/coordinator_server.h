// CoordinatorServer: the composition root. Opens the state store, recovers
// jobs, and serves gRPC and /metrics. main() only parses flags and calls it.
#pragma once

#include <atomic>
#include <memory>
#include <thread>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "common/metrics_http.h"
#include "common/serial_executor.h"
#include "common/tls.h"
#include "coordinator/admin_service.h"
#include "coordinator/auth.h"
#include "coordinator/binary_cache_server.h"
#include "coordinator/build_coordinator.h"
#include "coordinator/cas_service.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/farm_store_service.h"
#include "coordinator/fod_service.h"
#include "coordinator/grpc_services.h"
#include "coordinator/rocksdb_state_store.h"
#include "common/clock.h"
#include "coordinator/server_metrics.h"

namespace kiln {

struct CoordinatorOptions {
  std::string listen = "127.0.0.1:7600";
  std::string metrics_listen = "127.0.0.1:9600";
  std::string state_dir;
  // When set, written once serving: {"grpc":"host:port","metrics":"host:port"}.
  std::string ready_file;
  bool sync_writes = false;
  uint64_t max_blob_bytes = uint64_t{4} << 30;  // One CAS blob.
  BuildCoordinatorOptions core;
  // --tls-cert/--tls-key/--tls-ca: mutual TLS with workers. Without them,
  // only a loopback `listen` is allowed.
  TlsFiles tls;
  // Every client call needs a token (always so with TLS).
  bool require_tokens = false;
  // Time for the job logic and the FOD cache; null: the wall clock.
  const Clock* clock = nullptr;
  // Where the farm store is served as a Nix binary cache (loopback only);
  // empty: not served.
  std::string cache_listen;
  // The farm store's size limit (--cache-max-gb); 0: unbounded. Checked
  // every `cache_gc_interval`; a collection keeps the outputs of the
  // `cache_pin_buildsets` most recent buildsets with their closures.
  uint64_t cache_max_bytes = 0;
  // Where the farm store keeps NARs: "local" (STATE/nar) or an S3 bucket
  // (s3://BUCKET?endpoint=…&region=…), whose credentials are read from
  // `cache_s3_credentials_file` (an AWS-style credentials file).
  std::string cache_store = "local";
  std::string cache_s3_credentials_file;
  int cache_pin_buildsets = 10;
  absl::Duration cache_gc_interval = absl::Seconds(30);
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(const CoordinatorOptions& options);
  ~CoordinatorServer();

  // Stops accepting calls, ends streams, drains the strand. Idempotent.
  void Shutdown();

  const std::string& grpc_address() const { return grpc_address_; }
  // The admin socket (unix:STATE_DIR/admin.sock); "" when the path is too
  // long for a Unix socket.
  const std::string& admin_address() const { return admin_address_; }
  const std::string& metrics_address() const { return metrics_->address(); }
  // The binary cache's host:port; "" when not served.
  std::string cache_address() const { return cache_ != nullptr ? cache_->address() : ""; }

 private:
  CoordinatorServer() = default;

  // Declaration order is teardown order, reversed: the server goes first so
  // no reaction posts to a dead strand.
  std::unique_ptr<RocksDbStateStore> store_;
  std::unique_ptr<CoordinatorMetrics> coordinator_metrics_;
  std::unique_ptr<FarmStoreMetrics> farm_store_metrics_;
  std::unique_ptr<MetricsHttpServer> metrics_;
  std::unique_ptr<BinaryCacheServer> cache_;
  std::unique_ptr<SerialExecutor> strand_;
  std::unique_ptr<SerialExecutor> sender_;  // Starts writes to workers.
  std::unique_ptr<SerialExecutor> reader_;  // Reads stored logs (GetJobLog).
  std::unique_ptr<BuildCoordinator> core_;
  std::unique_ptr<Authorizer> auth_;
  std::unique_ptr<AdminServiceImpl> admin_service_;
  std::unique_ptr<BuildServiceImpl> build_service_;
  std::unique_ptr<WorkerServiceImpl> worker_service_;
  std::unique_ptr<CasServiceImpl> cas_service_;
  std::unique_ptr<FodServiceImpl> fod_service_;
  std::unique_ptr<FarmServiceImpl> farm_service_;
  std::unique_ptr<FarmStoreServiceImpl> farm_store_service_;
  std::unique_ptr<grpc::Server> server_;
  std::string grpc_address_;
  std::string admin_address_;
  bool shut_down_ = false;
  std::atomic<bool> serving_{false};  // Read by /readyz from a server thread.
  // Drives BuildCoordinator::Tick (leases) once a second, on the strand.
  absl::Notification stop_ticker_;
  std::thread ticker_;
  // Keeps the farm store under its limit (off the strand: a collection
  // reads every record).
  std::thread farm_gc_;

  void CollectFarmStore(const CoordinatorOptions& options);
};

}  // namespace kiln
