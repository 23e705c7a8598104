#include "coordinator/binary_cache_server.h"

#include <civetweb.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/net.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr char kKeyFile[] = "cache-key.secret";
constexpr char kCacheInfo[] = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

void Respond(mg_connection* conn, int status, const char* content_type, const std::string& body) {
  mg_response_header_start(conn, status);
  mg_response_header_add(conn, "Content-Type", content_type, -1);
  const std::string length = std::to_string(body.size());
  mg_response_header_add(conn, "Content-Length", length.c_str(), -1);
  mg_response_header_send(conn);
  const mg_request_info* request = mg_get_request_info(conn);
  const bool head =
      request != nullptr && request->request_method != nullptr && std::string_view(request->request_method) == "HEAD";
  if (!head && !body.empty()) mg_write(conn, body.data(), body.size());
}

absl::Status WriteKeyFile(const std::string& path, const std::string& text) {
  // Created 0600 before a byte is written: the secret is never readable by
  // others, not even for an instant.
  const std::string temp = path + ".tmp";
  ::unlink(temp.c_str());
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", temp, ": ", std::strerror(errno)));
  const std::string line = text + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(temp.c_str(), path.c_str()) != 0) {
    ::unlink(temp.c_str());
    return absl::InternalError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SigningKey> CreateCacheKey(const std::string& state_dir, const std::string& name) {
  ASSIGN_OR_RETURN(SigningKey key, SigningKey::Generate(name));
  std::error_code ec;
  std::filesystem::create_directories(state_dir, ec);
  RETURN_IF_ERROR(WriteKeyFile(absl::StrCat(state_dir, "/", kKeyFile), key.SecretKeyText()));
  return key;
}

absl::StatusOr<SigningKey> LoadOrCreateCacheKey(const std::string& state_dir, const std::string& name) {
  const std::string path = absl::StrCat(state_dir, "/", kKeyFile);
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) return absl::InternalError(absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
    return CreateCacheKey(state_dir, name);
  }
  if ((st.st_mode & 077) != 0) {
    return absl::PermissionDeniedError(
        absl::StrCat(path, " is readable by others (mode ", absl::StrFormat("%o", st.st_mode & 0777),
                     "): the farm's signing key must be the coordinator's alone (chmod 600)"));
  }
  std::string text;
  {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return absl::InternalError(absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
    char buf[512];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof(buf))) > 0 && text.size() < 4096) text.append(buf, static_cast<size_t>(n));
    ::close(fd);
  }
  absl::StatusOr<SigningKey> key = SigningKey::Parse(text);
  if (!key.ok()) return WithContext(key.status(), path);
  return key;
}

absl::StatusOr<std::unique_ptr<BinaryCacheServer>> BinaryCacheServer::Start(const std::string& address,
                                                                            FarmStore* store, SigningKey key) {
  ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(address));
  if (!IsLoopbackHost(hp.host)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--cache-listen=", address, ": the binary cache serves loopback only (no TLS yet)"));
  }
  static std::once_flag init_once;
  std::call_once(init_once, [] { mg_init_library(0); });
  auto server = std::unique_ptr<BinaryCacheServer>(new BinaryCacheServer(store, std::move(key)));
  // Nix fetches narinfos and NARs in parallel (http-connections = 25).
  const char* options[] = {"listening_ports", address.c_str(), "num_threads", "8", "enable_keep_alive", "yes", nullptr};
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
    return absl::UnavailableError(absl::StrCat("cannot serve the binary cache on ", address, ": ", error_text));
  }
  mg_set_request_handler(server->context_, "/", &BinaryCacheServer::Handle, server.get());
  mg_server_port ports[4] = {};
  const int count = mg_get_server_ports(server->context_, 4, ports);
  server->address_ = FormatHostPort(hp.host, count > 0 ? ports[0].port : hp.port);
  return server;
}

BinaryCacheServer::~BinaryCacheServer() {
  if (context_ != nullptr) mg_stop(context_);
}

int BinaryCacheServer::Handle(mg_connection* conn, void* self) {
  return static_cast<BinaryCacheServer*>(self)->Serve(conn);
}

int BinaryCacheServer::Serve(mg_connection* conn) {
  const mg_request_info* request = mg_get_request_info(conn);
  const std::string method = request->request_method != nullptr ? request->request_method : "";
  const std::string uri = request->local_uri != nullptr ? request->local_uri : "";
  if (method != "GET" && method != "HEAD") {
    Respond(conn, 405, "text/plain", "only GET and HEAD\n");
    return 405;
  }
  if (uri == "/nix-cache-info") {
    Respond(conn, 200, "text/x-nix-cache-info", kCacheInfo);
    return 200;
  }
  if (absl::EndsWith(uri, ".narinfo") && uri.find('/', 1) == std::string::npos) {
    const std::string hash_part(absl::StripSuffix(absl::StripPrefix(uri, "/"), ".narinfo"));
    absl::StatusOr<NarInfo> info = store_->Get(hash_part);
    if (absl::IsNotFound(info.status())) {
      Respond(conn, 404, "text/plain", "not in the farm store\n");
      return 404;
    }
    if (info.ok()) info = SignNarInfo(*std::move(info), key_);
    if (!info.ok()) {
      Respond(conn, 500, "text/plain", std::string(info.status().message()) + "\n");
      return 500;
    }
    Respond(conn, 200, "text/x-nix-narinfo", info->Render());
    return 200;
  }
  if (absl::StartsWith(uri, "/nar/")) {
    absl::StatusOr<std::string> file = store_->NarFile(uri.substr(5));
    if (!file.ok()) {
      Respond(conn, 404, "text/plain", "no such NAR\n");
      return 404;
    }
    mg_send_mime_file(conn, file->c_str(), "application/x-nix-nar");
    return 200;
  }
  Respond(conn, 404, "text/plain", "not found\n");
  return 404;
}

}  // namespace kiln
