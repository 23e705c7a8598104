#include "coordinator/server_metrics.h"

#include <atomic>
#include <chrono>
#include <string>
#include <utility>

#include <google/protobuf/descriptor.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"

namespace kiln {
namespace {

// gRPC's canonical code names, as other gRPC metrics spell them.
const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "Canceled";
    case grpc::StatusCode::UNKNOWN: return "Unknown";
    case grpc::StatusCode::INVALID_ARGUMENT: return "InvalidArgument";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DeadlineExceeded";
    case grpc::StatusCode::NOT_FOUND: return "NotFound";
    case grpc::StatusCode::ALREADY_EXISTS: return "AlreadyExists";
    case grpc::StatusCode::PERMISSION_DENIED: return "PermissionDenied";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "ResourceExhausted";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FailedPrecondition";
    case grpc::StatusCode::ABORTED: return "Aborted";
    case grpc::StatusCode::OUT_OF_RANGE: return "OutOfRange";
    case grpc::StatusCode::UNIMPLEMENTED: return "Unimplemented";
    case grpc::StatusCode::INTERNAL: return "Internal";
    case grpc::StatusCode::UNAVAILABLE: return "Unavailable";
    case grpc::StatusCode::DATA_LOSS: return "DataLoss";
    case grpc::StatusCode::UNAUTHENTICATED: return "Unauthenticated";
    default: return "Unknown";
  }
}

// "/pkg.Service/Method" → {"pkg.Service", "Method"} when the method exists,
// else {"unknown", "unknown"}.
std::pair<std::string, std::string> MethodLabels(const char* full_method) {
  const absl::string_view path = full_method == nullptr ? "" : full_method;
  const size_t slash = path.rfind('/');
  if (path.size() < 4 || path[0] != '/' || slash == 0 || slash == absl::string_view::npos)
    return {"unknown", "unknown"};
  std::string service(path.substr(1, slash - 1));
  std::string method(path.substr(slash + 1));
  // The health service's messages are not in the generated pool.
  const bool health = service == "grpc.health.v1.Health" && (method == "Check" || method == "Watch");
  if (!health && google::protobuf::DescriptorPool::generated_pool()->FindMethodByName(
                     absl::StrCat(service, ".", method)) == nullptr) {
    return {"unknown", "unknown"};
  }
  return {std::move(service), std::move(method)};
}

class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(GrpcServerMetrics* metrics, const char* method)
      : metrics_(metrics), method_(method), start_(std::chrono::steady_clock::now()) {}
  ~MetricsInterceptor() override {
    // A call that ended without the server sending a status was cancelled.
    if (!recorded_.load(std::memory_order_relaxed)) Record(grpc::StatusCode::CANCELLED);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // Batches of one call may be intercepted on different threads at once;
    // only the one sending the status records.
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS) &&
        !recorded_.load(std::memory_order_relaxed)) {
      Record(methods->GetSendStatus().error_code());
    }
    methods->Proceed();
  }

 private:
  void Record(grpc::StatusCode code) {
    recorded_.store(true, std::memory_order_relaxed);
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start_;
    metrics_->Record(method_, code, took.count());
  }

  GrpcServerMetrics* metrics_;
  const char* method_;
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> recorded_{false};
};

prometheus::MetricFamily Family(const char* name, const char* help, prometheus::MetricType type, double value) {
  prometheus::MetricFamily family;
  family.name = name;
  family.help = help;
  family.type = type;
  prometheus::ClientMetric metric;
  if (type == prometheus::MetricType::Counter) {
    metric.counter.value = value;
  } else {
    metric.gauge.value = value;
  }
  family.metric.push_back(std::move(metric));
  return family;
}

}  // namespace

GrpcServerMetrics::GrpcServerMetrics(prometheus::Registry& registry)
    : handled_(prometheus::BuildCounter()
                   .Name("kiln_grpc_server_handled_total")
                   .Help("RPCs the coordinator finished, by service, method and status code.")
                   .Register(registry)),
      handling_(prometheus::BuildHistogram()
                    .Name("kiln_grpc_server_handling_seconds")
                    .Help("Time from an RPC's start to its status; for streams, the stream's lifetime.")
                    .Register(registry)) {}

grpc::experimental::Interceptor* GrpcServerMetrics::CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) {
  return new MetricsInterceptor(this, info->method());
}

void GrpcServerMetrics::Record(const char* full_method, grpc::StatusCode code, double seconds) {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300, 3600};
  auto [service, method] = MethodLabels(full_method);
  handled_.Add({{"grpc_service", service}, {"grpc_method", method}, {"grpc_code", CodeName(code)}}).Increment();
  handling_.Add({{"grpc_service", service}, {"grpc_method", method}}, *buckets).Observe(seconds);
}

std::vector<prometheus::MetricFamily> StateStoreCollector::Collect() const {
  const RocksDbStateStore::Stats s = store_->GetStats();
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> out;
  auto d = [](uint64_t v) { return static_cast<double>(v); };
  out.push_back(Family("kiln_rocksdb_sst_files_bytes", "Size of the state database's SST files.", MetricType::Gauge,
                       d(s.sst_bytes)));
  out.push_back(Family("kiln_rocksdb_live_data_bytes", "RocksDB's estimate of the live data in the state database.",
                       MetricType::Gauge, d(s.live_data_bytes)));
  out.push_back(Family("kiln_rocksdb_memtable_bytes", "Memory held by the state database's memtables.",
                       MetricType::Gauge, d(s.memtable_bytes)));
  out.push_back(Family("kiln_rocksdb_pending_compaction_bytes",
                       "Bytes RocksDB estimates compaction must rewrite to settle the LSM tree.", MetricType::Gauge,
                       d(s.pending_compaction_bytes)));
  out.push_back(Family("kiln_rocksdb_running_compactions", "Compactions running now.", MetricType::Gauge,
                       d(s.running_compactions)));
  out.push_back(Family("kiln_rocksdb_writes_stopped",
                       "1 while RocksDB stops writes (too many L0 files, memtables "
                       "or pending compaction bytes).",
                       MetricType::Gauge, s.writes_stopped ? 1 : 0));
  out.push_back(Family("kiln_rocksdb_delayed_write_rate_bytes",
                       "Write rate RocksDB throttles to while slowing writes down; 0 when not throttled.",
                       MetricType::Gauge, d(s.delayed_write_rate)));
  prometheus::MetricFamily stalls;
  stalls.name = "kiln_rocksdb_write_stalls_total";
  stalls.help = "Write stalls since the coordinator started, by kind (stop: writes blocked; slowdown: throttled).";
  stalls.type = MetricType::Counter;
  for (auto [kind, value] : {std::pair<const char*, uint64_t>{"stop", s.stops}, {"slowdown", s.slowdowns}}) {
    prometheus::ClientMetric m;
    m.label.push_back({"kind", kind});
    m.counter.value = d(value);
    stalls.metric.push_back(std::move(m));
  }
  out.push_back(std::move(stalls));
  return out;
}

}  // namespace kiln
