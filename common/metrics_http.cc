#include "common/metrics_http.h"

#include <exception>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/net.h"

namespace kiln {

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::shared_ptr<prometheus::Registry> registry) {
  absl::StatusOr<HostPort> hp = ParseHostPort(address);
  if (!hp.ok()) return hp.status();
  auto server = std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer());
  try {
    server->exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", address, ": ", e.what()));
  }
  server->exposer_->RegisterCollectable(registry);
  auto ports = server->exposer_->GetListeningPorts();
  const int port = ports.empty() ? hp->port : ports.front();
  server->bound_address_ = absl::StrCat(hp->host, ":", port);
  return server;
}

}  // namespace kiln
