#include "coordinator/coordinator_server.h"

#include <filesystem>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/clock.h"
#include "common/grpc_util.h"
#include "common/http_request.h"
#include "common/log.h"
#include "common/net.h"
#include "common/status_macros.h"

namespace kiln {

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(const CoordinatorOptions& options) {
  if (options.state_dir.empty()) return absl::InvalidArgumentError("--state-dir is required");
  absl::StatusOr<HostPort> listen = ParseHostPort(options.listen);
  if (!listen.ok()) return listen.status();
  if (!options.tls.enabled()) {
    RETURN_IF_ERROR(CheckPlaintextAllowed("kiln-coordinator", {options.listen}));
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = MakeServerCredentials(options.tls);
  if (!credentials.ok()) return credentials.status();
  std::error_code ec;
  std::filesystem::create_directories(options.state_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", options.state_dir, ": ", ec.message()));
  // The state (token hashes, sources, the admin socket) is the
  // coordinator's alone.
  std::filesystem::permissions(options.state_dir, std::filesystem::perms::owner_all, ec);

  auto server = std::unique_ptr<CoordinatorServer>(new CoordinatorServer());
  const Clock* const clock = options.clock != nullptr ? options.clock : RealClock::Get();
  auto store = RocksDbStateStore::Open((std::filesystem::path(options.state_dir) / "rocksdb").string(),
                                       options.sync_writes, options.max_blob_bytes, clock);
  if (!store.ok()) return store.status();
  server->store_ = *std::move(store);

  auto registry = std::make_shared<prometheus::Registry>();
  server->coordinator_metrics_ = std::make_unique<CoordinatorMetrics>(registry);
  server->strand_ = std::make_unique<SerialExecutor>("kiln-strand");
  server->sender_ = std::make_unique<SerialExecutor>("kiln-sender");
  server->reader_ = std::make_unique<SerialExecutor>("kiln-reader");
  server->core_ = std::make_unique<BuildCoordinator>(server->store_.get(), server->coordinator_metrics_.get(), clock,
                                                     options.core, server->store_->cas());
  RETURN_IF_ERROR(server->core_->Recover());
  // Group commit: one state write, one scheduling round and one message per
  // worker for each batch of events the strand runs.
  server->core_->set_batched(true);
  server->strand_->SetAfterBatch([core = server->core_.get()] { core->Flush(); });

  // /readyz: serving gRPC, not shutting down, and the state database takes
  // writes.
  auto readiness = [s = server.get()]() -> absl::Status {
    if (!s->serving_.load()) return absl::UnavailableError("not serving gRPC (starting or shutting down)");
    if (s->store_->WritesStopped()) return absl::UnavailableError("the state database has stopped writes");
    if (!s->core_->state_writable()) {
      return absl::UnavailableError("state writes fail (out of disk space?): taking no new work until they resume");
    }
    return absl::OkStatus();
  };
  auto metrics = MetricsHttpServer::Start(
      options.metrics_listen, {registry, std::make_shared<StateStoreCollector>(server->store_.get())}, readiness);
  if (!metrics.ok()) return metrics.status();
  server->metrics_ = *std::move(metrics);

  const bool tls = options.tls.enabled();
  server->auth_ = std::make_unique<Authorizer>(server->store_->tokens(), options.require_tokens || tls, tls,
                                               server->coordinator_metrics_.get());
  const Authorizer* auth = server->auth_.get();
  server->admin_service_ = std::make_unique<AdminServiceImpl>(server->store_->tokens(), auth, server->store_.get());
  server->build_service_ = std::make_unique<BuildServiceImpl>(server->core_.get(), server->strand_.get(), auth,
                                                              server->store_.get(), server->reader_.get());
  server->worker_service_ =
      std::make_unique<WorkerServiceImpl>(server->core_.get(), server->strand_.get(), server->sender_.get(), auth);
  server->farm_service_ = std::make_unique<FarmServiceImpl>(server->core_.get(), server->strand_.get(), auth);
  server->cas_service_ = std::make_unique<CasServiceImpl>(server->store_->cas(), server->coordinator_metrics_.get(),
                                                          CasServiceLimits{}, auth);
  server->fod_service_ =
      std::make_unique<FodServiceImpl>(server->store_->fod_cache(), server->coordinator_metrics_.get(), auth);
  // The farm's signing key, made at first start: workers are handed it for
  // their Nix, and the binary cache signs with it.
  ASSIGN_OR_RETURN(SigningKey cache_key, LoadOrCreateCacheKey(options.state_dir));
  if (!options.cache_store.empty() && options.cache_store != "local") {
    ASSIGN_OR_RETURN(S3Location location, ParseS3Uri(options.cache_store), "--cache-store");
    if (options.cache_s3_credentials_file.empty()) {
      return absl::InvalidArgumentError("--cache-store=s3://… needs --cache-s3-credentials-file");
    }
    ASSIGN_OR_RETURN(S3Credentials credentials, LoadS3Credentials(options.cache_s3_credentials_file));
    RETURN_IF_ERROR(server->store_->UseObjectStorage(
        std::make_unique<S3ObjectStore>(std::move(location), std::move(credentials)), cache_key));
    LogInfo("farm-store", "NARs and signed narinfos in ", UrlWithoutQuery(options.cache_store));
  }
  server->farm_store_metrics_ = std::make_unique<FarmStoreMetrics>(*registry);
  server->farm_store_metrics_->Update(server->store_->farm_store()->Stats());
  server->farm_store_metrics_->limit_bytes.Set(static_cast<double>(options.cache_max_bytes));
  server->farm_store_service_ = std::make_unique<FarmStoreServiceImpl>(server->store_->farm_store(), cache_key, auth,
                                                                       server->farm_store_metrics_.get());
  server->coordinator_metrics_->fod_entries.Set(static_cast<double>(server->store_->fod_cache()->size()));
  // Standard gRPC tooling: the health-checking service (load balancers,
  // grpc_health_probe) and server reflection (grpcurl, grpc_cli).
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, *credentials, &port);
  // The admin socket: only who may enter the state directory (0700) reaches
  // it; what arrives on it is the local administrator's.
  const std::string socket_path = (std::filesystem::path(options.state_dir) / "admin.sock").string();
  if (socket_path.size() < 100) {
    std::filesystem::remove(socket_path, ec);
    server->admin_address_ = "unix:" + socket_path;
    builder.AddListeningPort(server->admin_address_, grpc::InsecureServerCredentials());
  } else {
    LogWarning("coordinator", "no admin socket: ", socket_path, " is too long for a Unix socket");
  }
  builder.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
  builder.SetMaxSendMessageSize(kMaxGrpcMessageBytes);
  // Accept the clients' keepalive pings (see MakeChannel).
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 20000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<GrpcServerMetrics>(*registry));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.RegisterService(server->build_service_.get());
  builder.RegisterService(server->worker_service_.get());
  builder.RegisterService(server->farm_service_.get());
  builder.RegisterService(server->cas_service_.get());
  builder.RegisterService(server->fod_service_.get());
  builder.RegisterService(server->farm_store_service_.get());
  builder.RegisterService(server->admin_service_.get());
  server->server_ = builder.BuildAndStart();
  if (!server->server_ || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  server->grpc_address_ = absl::StrCat(listen->host, ":", port);
  if (!server->admin_address_.empty()) {
    std::filesystem::permissions(socket_path, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write,
                                 ec);
  }

  server->ticker_ = std::thread([s = server.get()] {
    while (!s->stop_ticker_.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      s->strand_->Post([core = s->core_.get()] { core->Tick(); });
    }
  });

  server->farm_gc_ = std::thread([s = server.get(), options] {
    while (!s->stop_ticker_.WaitForNotificationWithTimeout(options.cache_gc_interval)) s->CollectFarmStore(options);
  });

  if (!options.cache_listen.empty()) {
    const std::string public_key = cache_key.PublicKeyText();
    BinaryCacheAccess access;
    if (tls || options.require_tokens) access.auth = auth;
    ASSIGN_OR_RETURN(server->cache_,
                     BinaryCacheServer::Start(options.cache_listen, server->store_->farm_store(), cache_key,
                                              server->farm_store_metrics_.get(), std::move(access)));
    LogInfo("coordinator", "farm store served as a Nix binary cache on http://", server->cache_->address(),
            tls || options.require_tokens ? " (a cache-read token needed)" : "", " (trusted-public-keys = ", public_key,
            ")");
  }
  if (!options.ready_file.empty()) {
    nlohmann::json ready = {{"grpc", server->grpc_address_}, {"metrics", server->metrics_->address()}};
    if (server->cache_ != nullptr) ready["cache"] = server->cache_->address();
    RETURN_IF_ERROR(WriteFileAtomically(options.ready_file, ready.dump() + "\n"));
  }
  server->serving_.store(true);
  LogInfo("coordinator", "serving gRPC", options.tls.enabled() ? " (mutual TLS for workers)" : " (plaintext)", " on ",
          server->grpc_address_, ", metrics on http://", server->metrics_->address(), "/metrics, state in ",
          options.state_dir);
  return server;
}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

void CoordinatorServer::Shutdown() {
  if (shut_down_) return;
  shut_down_ = true;
  serving_.store(false);
  if (server_) {
    // Health checks see the coordinator leave before its streams end.
    if (auto* health = server_->GetHealthCheckService(); health != nullptr) health->SetServingStatus(false);
    // End the long-lived streams first, or Shutdown would wait for them.
    absl::Notification closed;
    strand_->Post([this, &closed] {
      core_->CloseAll();
      closed.Notify();
    });
    closed.WaitForNotification();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_->Wait();
  }
  if (ticker_.joinable() || farm_gc_.joinable()) stop_ticker_.Notify();
  if (ticker_.joinable()) ticker_.join();
  if (farm_gc_.joinable()) farm_gc_.join();
  reader_.reset();  // Its reads post to the strand: first.
  strand_.reset();  // Runs what the last reactions posted.
  sender_.reset();
}

void CoordinatorServer::CollectFarmStore(const CoordinatorOptions& options) {
  FarmStore* farm = store_->farm_store();
  const FarmStoreStats stats = farm->Stats();
  farm_store_metrics_->Update(stats);
  if (options.cache_max_bytes == 0 || stats.file_bytes <= options.cache_max_bytes) return;
  // The outputs of the most recent buildsets, read on the strand.
  std::vector<std::string> pinned;
  absl::Notification read;
  strand_->Post([&] {
    pinned = core_->RecentOutputs(static_cast<size_t>(std::max(0, options.cache_pin_buildsets)));
    read.Notify();
  });
  read.WaitForNotification();
  FarmGcPolicy policy;
  policy.max_bytes = options.cache_max_bytes;
  // Down to 90%: a store at its limit is not collected on every upload.
  policy.target_bytes = options.cache_max_bytes / 10 * 9;
  policy.pinned_roots = std::move(pinned);
  absl::StatusOr<FarmGcReport> report = farm->CollectGarbage(policy);
  if (!report.ok()) {
    LogWarning("farm-store", "garbage collection failed: ", report.status().message());
    return;
  }
  farm_store_metrics_->Update(farm->Stats());
  if (report->paths_collected == 0) {
    LogWarning("farm-store", "over its limit (", stats.file_bytes, " bytes) but every path is pinned or needed (",
               report->paths_pinned, " pinned)");
    return;
  }
  farm_store_metrics_->gc_runs.Increment();
  farm_store_metrics_->gc_collected_paths.Increment(static_cast<double>(report->paths_collected));
  farm_store_metrics_->gc_collected_bytes.Increment(static_cast<double>(report->bytes_collected));
  LogInfo("farm-store", "collected ", report->paths_collected, " path(s), ", report->bytes_collected, " bytes; ",
          report->paths_left, " path(s), ", report->bytes_left, " bytes left (", report->paths_pinned, " pinned)");
}

}  // namespace kiln
