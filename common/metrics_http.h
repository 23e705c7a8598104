// Serves a prometheus-cpp registry at http://ADDRESS/metrics.
#pragma once

#include <memory>
#include <string>

#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include "absl/status/statusor.h"

namespace kiln {

class MetricsHttpServer {
 public:
  // Binds `address` ("127.0.0.1:9600"; port 0 picks a free one). The exposer
  // library throws on bind failure; that becomes a Status here.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry);

  // "host:port" actually bound.
  const std::string& address() const { return bound_address_; }

 private:
  MetricsHttpServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string bound_address_;
};

}  // namespace kiln
