#include "coordinator/binary_cache_server.h"

#include <civetweb.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "common/metrics_http.h"
#include "common/net.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr char kKeyFile[] = "cache-key.secret";
// The cache's answers carry no Cache-Control: no-store (clients keep their own
// narinfo cache); only the metrics listener says no-store.
constexpr bool kCacheable = true;
// Civetweb gives each kept-alive connection a thread, and one Nix client
// opens up to 25 (http-connections): room for a few clients at full speed.
constexpr int kThreads = 64;
constexpr char kCacheInfo[] = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

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
                                                                            FarmStore* store, SigningKey key,
                                                                            FarmStoreMetrics* metrics,
                                                                            BinaryCacheAccess access) {
  ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(address));
  if (!IsLoopbackHost(hp.host)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--cache-listen=", address,
                     ": the binary cache serves loopback only; put a TLS-terminating proxy in front of it for "
                     "other hosts (docs/OPERATIONS.md)"));
  }
  auto server = std::unique_ptr<BinaryCacheServer>(new BinaryCacheServer(store, std::move(key), metrics, access.auth));
  // Nix fetches narinfos and NARs in parallel (http-connections = 25).
  ASSIGN_OR_RETURN(server->context_, StartCivetweb(address, kThreads, "the binary cache", &server->address_));
  mg_set_request_handler(server->context_, "/", &BinaryCacheServer::Handle, server.get());
  return server;
}

BinaryCacheServer::~BinaryCacheServer() { StopCivetweb(context_, address_); }

int BinaryCacheServer::Handle(mg_connection* conn, void* self) {
  return static_cast<BinaryCacheServer*>(self)->Serve(conn);
}

bool BinaryCacheServer::Authorized(mg_connection* conn) {
  if (auth_ == nullptr) return true;
  absl::Status refused = absl::UnauthenticatedError("a token is needed: the HTTP Basic password (netrc-file)");
  const char* header = mg_get_header(conn, "Authorization");
  absl::string_view value = header != nullptr ? header : "";
  std::string decoded;
  if (absl::ConsumePrefix(&value, "Basic ") && value.size() < 4096 &&
      absl::Base64Unescape(absl::StripAsciiWhitespace(value), &decoded)) {
    const size_t colon = decoded.find(':');
    const std::string token = colon == std::string::npos ? decoded : decoded.substr(colon + 1);
    refused = auth_->CheckToken(token, Scope::kCacheRead).status();
  }
  if (refused.ok()) return true;
  // The reason, not the token: nothing from the request is echoed.
  const std::string body = absl::StrCat(refused.message(), "\n");
  mg_printf(conn,
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"kiln farm store\"\r\n"
            "Content-Type: text/plain\r\nContent-Length: %zu\r\n\r\n%s",
            body.size(), body.c_str());
  return false;
}

int BinaryCacheServer::Serve(mg_connection* conn) {
  if (!Authorized(conn)) return 401;
  const mg_request_info* request = mg_get_request_info(conn);
  const std::string method = request->request_method != nullptr ? request->request_method : "";
  const std::string uri = request->local_uri != nullptr ? request->local_uri : "";
  if (method != "GET" && method != "HEAD") {
    RespondHttp(conn, 405, "text/plain", "only GET and HEAD\n", kCacheable);
    return 405;
  }
  if (uri == "/nix-cache-info") {
    RespondHttp(conn, 200, "text/x-nix-cache-info", kCacheInfo, kCacheable);
    return 200;
  }
  if (absl::EndsWith(uri, ".narinfo") && uri.find('/', 1) == std::string::npos) {
    const std::string hash_part(absl::StripSuffix(absl::StripPrefix(uri, "/"), ".narinfo"));
    absl::StatusOr<NarInfo> info = store_->Get(hash_part);
    if (metrics_ != nullptr && (info.ok() || absl::IsNotFound(info.status()))) {
      metrics_->NarInfoRequests("http", info.ok()).Increment();
    }
    if (absl::IsNotFound(info.status())) {
      RespondHttp(conn, 404, "text/plain", "not in the farm store\n", kCacheable);
      return 404;
    }
    if (info.ok()) info = SignNarInfo(*std::move(info), key_);
    if (!info.ok()) {
      RespondHttp(conn, 500, "text/plain", std::string(info.status().message()) + "\n", kCacheable);
      return 500;
    }
    RespondHttp(conn, 200, "text/x-nix-narinfo", info->Render(), kCacheable);
    return 200;
  }
  if (absl::StartsWith(uri, "/nar/")) {
    absl::StatusOr<NarLocation> location = store_->LocateNar(uri.substr(5));
    if (!location.ok()) {
      RespondHttp(conn, 404, "text/plain", "no such NAR\n", kCacheable);
      return 404;
    }
    if (!location->url.empty()) {
      // In object storage: the reader fetches it there (a presigned URL,
      // short-lived, so not cached).
      mg_printf(conn, "HTTP/1.1 302 Found\r\nLocation: %s\r\nCache-Control: no-store\r\nContent-Length: 0\r\n\r\n",
                location->url.c_str());
      if (metrics_ != nullptr) metrics_->NarRedirects("http").Increment();
      return 302;
    }
    mg_send_mime_file(conn, location->file.c_str(), "application/x-nix-nar");
    struct stat st;
    if (metrics_ != nullptr && method == "GET" && ::stat(location->file.c_str(), &st) == 0) {
      metrics_->ServedBytes("http").Increment(static_cast<double>(st.st_size));
    }
    return 200;
  }
  RespondHttp(conn, 404, "text/plain", "not found\n", kCacheable);
  return 404;
}

}  // namespace kiln
