#include "common/metrics_http.h"

#include <civetweb.h>

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <mutex>
#include <thread>
#include <utility>

#include <prometheus/text_serializer.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/net.h"

namespace kiln {
namespace {

void Respond(mg_connection* conn, int status, const char* content_type, const std::string& body) {
  mg_response_header_start(conn, status);
  mg_response_header_add(conn, "Content-Type", content_type, -1);
  const std::string length = std::to_string(body.size());
  mg_response_header_add(conn, "Content-Length", length.c_str(), -1);
  mg_response_header_add(conn, "Cache-Control", "no-store", -1);
  mg_response_header_send(conn);
  const mg_request_info* request = mg_get_request_info(conn);
  const bool head =
      request != nullptr && request->request_method != nullptr && std::string_view(request->request_method) == "HEAD";
  if (!head && !body.empty()) mg_write(conn, body.data(), body.size());
}

constexpr char kPlainText[] = "text/plain; charset=utf-8";

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
    ReadinessCheck readiness) {
  absl::StatusOr<HostPort> hp = ParseHostPort(address);
  if (!hp.ok()) return hp.status();
  static std::once_flag init_once;
  std::call_once(init_once, [] { mg_init_library(0); });

  auto server = std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer());
  server->collectables_ = std::move(collectables);
  server->readiness_ = std::move(readiness);

  // Two threads: a scrape and a probe never wait for each other.
  const char* options[] = {"listening_ports", address.c_str(), "num_threads", "2", "enable_keep_alive", "yes", nullptr};
  mg_callbacks callbacks = {};
  mg_init_data init = {};
  init.callbacks = &callbacks;
  init.configuration_options = options;
  char error_text[256] = {};
  unsigned error_code = 0;
  mg_error_data error = {};
  error.code = &error_code;
  error.text = error_text;
  error.text_buffer_size = sizeof(error_text);
  server->context_ = mg_start2(&init, &error);
  if (server->context_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", address, ": ", error_text));
  }
  mg_set_request_handler(server->context_, "/metrics$", &MetricsHttpServer::HandleMetrics, server.get());
  mg_set_request_handler(server->context_, "/healthz$", &MetricsHttpServer::HandleHealthz, server.get());
  mg_set_request_handler(server->context_, "/readyz$", &MetricsHttpServer::HandleReadyz, server.get());

  mg_server_port ports[4] = {};
  const int count = mg_get_server_ports(server->context_, 4, ports);
  const int port = count > 0 ? ports[0].port : hp->port;
  server->bound_address_ = FormatHostPort(hp->host, port);
  server->host_ = hp->host;
  server->port_ = port;
  return server;
}

namespace {

// Opens and closes one TCP connection to host:port; errors are ignored.
void Knock(const std::string& host, int port) {
  addrinfo hints = {};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const bool connected = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0;
    ::close(fd);
    if (connected) break;
  }
  ::freeaddrinfo(found);
}

}  // namespace

MetricsHttpServer::~MetricsHttpServer() {
  if (context_ == nullptr) return;
  // mg_stop waits for handlers in flight, which use this object, and for
  // civetweb's listening thread, which looks at its stop flag only between
  // polls of up to 2 s. A connection ends such a poll, so knock until
  // mg_stop returns: a daemon then stops in milliseconds, not seconds.
  absl::Notification stopped;
  std::thread knocker([&] {
    std::string host = host_;
    if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
    if (host == "::") host = "::1";
    for (int i = 0; i < 150 && !stopped.WaitForNotificationWithTimeout(absl::Milliseconds(20)); ++i) {
      Knock(host, port_);
    }
  });
  mg_stop(context_);
  stopped.Notify();
  knocker.join();
}

int MetricsHttpServer::HandleMetrics(mg_connection* conn, void* self) {
  auto* server = static_cast<MetricsHttpServer*>(self);
  std::vector<prometheus::MetricFamily> families;
  for (const auto& collectable : server->collectables_) {
    std::vector<prometheus::MetricFamily> more = collectable->Collect();
    families.insert(families.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  }
  const std::string body = prometheus::TextSerializer().Serialize(families);
  // The exposition format's content type, version 0.0.4.
  Respond(conn, 200, "text/plain; version=0.0.4; charset=utf-8", body);
  return 200;
}

int MetricsHttpServer::HandleHealthz(mg_connection* conn, void*) {
  // Alive: the process answers. Whether it can work is /readyz's question.
  Respond(conn, 200, kPlainText, "ok\n");
  return 200;
}

int MetricsHttpServer::HandleReadyz(mg_connection* conn, void* self) {
  auto* server = static_cast<MetricsHttpServer*>(self);
  absl::Status ready = server->readiness_ ? server->readiness_() : absl::OkStatus();
  if (ready.ok()) {
    Respond(conn, 200, kPlainText, "ready\n");
    return 200;
  }
  Respond(conn, 503, kPlainText, absl::StrCat("not ready: ", ready.message(), "\n"));
  return 503;
}

}  // namespace kiln
