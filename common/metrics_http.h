// The daemons' HTTP side: Prometheus text at /metrics, liveness at /healthz
// and readiness at /readyz, served by civetweb (the server prometheus-cpp's
// own exposer wraps; used directly because the exposer cannot serve anything
// but metrics).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/collectable.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

struct mg_context;
struct mg_connection;

namespace kiln {

// The civetweb plumbing the daemons' HTTP listeners share (this one and the
// coordinator's binary cache). StartCivetweb binds `address` with `threads`
// handler threads (`what` names the listener in errors) and gives the
// host:port bound; StopCivetweb stops it without waiting out civetweb's
// poll of up to 2 s; RespondHttp answers a request whole (no body for HEAD;
// `cacheable` false adds Cache-Control: no-store).
absl::StatusOr<mg_context*> StartCivetweb(const std::string& address, int threads, absl::string_view what,
                                          std::string* bound_address);
void StopCivetweb(mg_context* context, const std::string& bound_address);
void RespondHttp(mg_connection* conn, int status, const char* content_type, const std::string& body,
                 bool cacheable = false);

class MetricsHttpServer {
 public:
  // Whether the daemon can do its work now (OK) or why not. Called on each
  // /readyz request from a server thread; must be thread-safe.
  using ReadinessCheck = std::function<absl::Status()>;

  // Binds `address` ("127.0.0.1:9600"; port 0 picks a free one). Each scrape
  // collects every collectable in order. Without a readiness check, /readyz
  // answers like /healthz.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
      ReadinessCheck readiness = nullptr);
  ~MetricsHttpServer();

  // "host:port" actually bound.
  const std::string& address() const { return bound_address_; }

 private:
  MetricsHttpServer() = default;
  static int HandleMetrics(mg_connection* conn, void* self);
  static int HandleHealthz(mg_connection* conn, void* self);
  static int HandleReadyz(mg_connection* conn, void* self);

  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
  ReadinessCheck readiness_;
  mg_context* context_ = nullptr;
  std::string bound_address_;
};

}  // namespace kiln
