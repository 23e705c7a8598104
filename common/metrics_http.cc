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

constexpr char kPlainText[] = "text/plain; charset=utf-8";

}  // namespace

void RespondHttp(mg_connection* conn, int status, const char* content_type, const std::string& body, bool cacheable) {
  mg_response_header_start(conn, status);
  mg_response_header_add(conn, "Content-Type", content_type, -1);
  const std::string length = std::to_string(body.size());
  mg_response_header_add(conn, "Content-Length", length.c_str(), -1);
  if (!cacheable) mg_response_header_add(conn, "Cache-Control", "no-store", -1);
  mg_response_header_send(conn);
  const mg_request_info* request = mg_get_request_info(conn);
  const bool head =
      request != nullptr && request->request_method != nullptr && std::string_view(request->request_method) == "HEAD";
  if (!head && !body.empty()) mg_write(conn, body.data(), body.size());
}

absl::StatusOr<mg_context*> StartCivetweb(const std::string& address, int threads, absl::string_view what,
                                          std::string* bound_address) {
  absl::StatusOr<HostPort> hp = ParseHostPort(address);
  if (!hp.ok()) return hp.status();
  static std::once_flag init_once;
  // No TLS: Debian's civetweb 1.15 loads libssl at run time through a
  // table of OpenSSL 1.1 functions, and with OpenSSL 3 it calls a null
  // pointer on the first TLS connection (seen: SIGSEGV in a civetweb
  // worker). Listeners stay plain HTTP on loopback.
  std::call_once(init_once, [] { mg_init_library(0); });
  const std::string thread_count = std::to_string(threads);
  // tcp_nodelay: a response is a header and a body written separately;
  // with Nagle's algorithm the body waits for the client's delayed ACK of
  // the header (40 ms on Linux), which made every narinfo of a binary cache
  // cost 40-80 ms.
  const char* options[] = {"listening_ports",
                           address.c_str(),
                           "num_threads",
                           thread_count.c_str(),
                           "enable_keep_alive",
                           "yes",
                           "tcp_nodelay",
                           "1",
                           nullptr};
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
  mg_context* context = mg_start2(&init, &error);
  if (context == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve ", what, " on ", address, ": ", error_text));
  }
  mg_server_port bound[4] = {};
  const int count = mg_get_server_ports(context, 4, bound);
  *bound_address = FormatHostPort(hp->host, count > 0 ? bound[0].port : hp->port);
  return context;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, std::vector<std::shared_ptr<prometheus::Collectable>> collectables,
    ReadinessCheck readiness) {
  auto server = std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer());
  server->collectables_ = std::move(collectables);
  server->readiness_ = std::move(readiness);
  // Two threads: a scrape and a probe never wait for each other.
  absl::StatusOr<mg_context*> context = StartCivetweb(address, 2, "metrics", &server->bound_address_);
  if (!context.ok()) return context.status();
  server->context_ = *context;
  mg_set_request_handler(server->context_, "/metrics$", &MetricsHttpServer::HandleMetrics, server.get());
  mg_set_request_handler(server->context_, "/healthz$", &MetricsHttpServer::HandleHealthz, server.get());
  mg_set_request_handler(server->context_, "/readyz$", &MetricsHttpServer::HandleReadyz, server.get());
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

void StopCivetweb(mg_context* context, const std::string& bound_address) {
  if (context == nullptr) return;
  // mg_stop waits for handlers in flight, which use their server object, and
  // for civetweb's listening thread, which looks at its stop flag only
  // between polls of up to 2 s. A connection ends such a poll, so knock until
  // mg_stop returns: a daemon then stops in milliseconds, not seconds.
  absl::StatusOr<HostPort> hp = ParseHostPort(bound_address);
  absl::Notification stopped;
  std::thread knocker([&] {
    if (!hp.ok()) return;
    std::string host = hp->host;
    if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
    if (host == "::") host = "::1";
    for (int i = 0; i < 150 && !stopped.WaitForNotificationWithTimeout(absl::Milliseconds(20)); ++i) {
      Knock(host, hp->port);
    }
  });
  mg_stop(context);
  stopped.Notify();
  knocker.join();
}

MetricsHttpServer::~MetricsHttpServer() { StopCivetweb(context_, bound_address_); }

int MetricsHttpServer::HandleMetrics(mg_connection* conn, void* self) {
  auto* server = static_cast<MetricsHttpServer*>(self);
  std::vector<prometheus::MetricFamily> families;
  for (const auto& collectable : server->collectables_) {
    std::vector<prometheus::MetricFamily> more = collectable->Collect();
    families.insert(families.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  }
  const std::string body = prometheus::TextSerializer().Serialize(families);
  // The exposition format's content type, version 0.0.4.
  RespondHttp(conn, 200, "text/plain; version=0.0.4; charset=utf-8", body);
  return 200;
}

int MetricsHttpServer::HandleHealthz(mg_connection* conn, void*) {
  // Alive: the process answers. Whether it can work is /readyz's question.
  RespondHttp(conn, 200, kPlainText, "ok\n");
  return 200;
}

int MetricsHttpServer::HandleReadyz(mg_connection* conn, void* self) {
  auto* server = static_cast<MetricsHttpServer*>(self);
  absl::Status ready = server->readiness_ ? server->readiness_() : absl::OkStatus();
  if (ready.ok()) {
    RespondHttp(conn, 200, kPlainText, "ready\n");
    return 200;
  }
  RespondHttp(conn, 503, kPlainText, absl::StrCat("not ready: ", ready.message(), "\n"));
  return 503;
}

}  // namespace kiln
