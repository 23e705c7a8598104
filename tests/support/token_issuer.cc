#include "tests/support/token_issuer.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"

namespace kiln::testing {
namespace {

std::string UrlDecode(absl::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    int hex = 0;
    if (s[i] == '%' && i + 2 < s.size() && absl::SimpleHexAtoi(s.substr(i + 1, 2), &hex)) {
      out.push_back(static_cast<char>(hex));
      i += 2;
    } else {
      out.push_back(s[i] == '+' ? ' ' : s[i]);
    }
  }
  return out;
}

void WriteAll(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

void Reply(int fd, int status, const std::string& reason, const std::string& body) {
  WriteAll(fd, absl::StrCat("HTTP/1.1 ", status, " ", reason, "\r\nContent-Type: application/json\r\nContent-Length: ",
                            body.size(), "\r\nConnection: close\r\n\r\n", body));
}

absl::Status Openssl(const std::vector<std::string>& args) {
  ProcessSpec spec;
  spec.argv = {"openssl"};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Minutes(1));
  if (!r.ok()) return r.status();
  if (!r->exit.Success()) return absl::InternalError(absl::StrCat("openssl failed: ", r->stderr_data));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<TokenIssuer>> TokenIssuer::Start(const Options& options) {
  auto issuer = std::unique_ptr<TokenIssuer>(new TokenIssuer());
  issuer->options_ = options;
  issuer->expires_in_ = options.expires_in_seconds;
  if (absl::Status s = issuer->MakeKeys(); !s.ok()) return s;

  issuer->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (issuer->listen_fd_ < 0) return absl::InternalError("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (::bind(issuer->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(issuer->listen_fd_, 16) != 0 ||
      ::getsockname(issuer->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return absl::InternalError("cannot listen on 127.0.0.1");
  }
  issuer->port_ = ntohs(addr.sin_port);
  issuer->server_ = std::thread([raw = issuer.get()] { raw->Serve(); });
  return issuer;
}

TokenIssuer::~TokenIssuer() {
  stop_ = true;
  if (server_.joinable()) server_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
}

std::string TokenIssuer::realm() const { return absl::StrCat("http://127.0.0.1:", port_, "/token"); }

absl::Status TokenIssuer::MakeKeys() {
  // A CA and a signing certificate under it; the registry trusts the CA.
  std::filesystem::remove_all(dir_.Sub("keys"));
  std::filesystem::create_directories(dir_.Sub("keys"));
  const std::string k = dir_.Sub("keys/");
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", k + "ca.key", "-out", k + "ca.crt", "-days",
            "2", "-subj", "/CN=kiln-test-token-ca"},
           {"req", "-newkey", "rsa:2048", "-nodes", "-keyout", k + "sign.key", "-out", k + "sign.csr", "-subj",
            "/CN=kiln-test-token-signer"},
           {"x509", "-req", "-in", k + "sign.csr", "-CA", k + "ca.crt", "-CAkey", k + "ca.key", "-CAcreateserial",
            "-out", k + "sign.crt", "-days", "2"},
           {"x509", "-in", k + "sign.crt", "-outform", "DER", "-out", k + "sign.der"}}) {
    if (absl::Status s = Openssl(args); !s.ok()) return s;
  }
  WriteFileOrDie(root_bundle(), ReadFileOrDie(k + "ca.crt"));
  absl::MutexLock lock(&mu_);
  key_pem_ = ReadFileOrDie(k + "sign.key");
  cert_der_ = ReadFileOrDie(k + "sign.der");
  return absl::OkStatus();
}

absl::Status TokenIssuer::Rotate() { return MakeKeys(); }

std::vector<std::string> TokenIssuer::scopes_requested() const {
  absl::MutexLock lock(&mu_);
  return scopes_;
}

std::string TokenIssuer::Sign(const std::string& claims) {
  std::string key_pem, cert_der;
  {
    absl::MutexLock lock(&mu_);
    key_pem = key_pem_;
    cert_der = cert_der_;
  }
  const nlohmann::json header = {{"typ", "JWT"}, {"alg", "RS256"}, {"x5c", {absl::Base64Escape(cert_der)}}};
  const std::string signing_input =
      absl::StrCat(absl::WebSafeBase64Escape(header.dump()), ".", absl::WebSafeBase64Escape(claims));
  BIO* bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  std::string signature;
  if (key != nullptr) {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    size_t size = 0;
    if (EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1 &&
        EVP_DigestSign(ctx, nullptr, &size, reinterpret_cast<const unsigned char*>(signing_input.data()),
                       signing_input.size()) == 1) {
      signature.resize(size);
      if (EVP_DigestSign(ctx, reinterpret_cast<unsigned char*>(signature.data()), &size,
                         reinterpret_cast<const unsigned char*>(signing_input.data()), signing_input.size()) == 1) {
        signature.resize(size);
      } else {
        signature.clear();
      }
    }
    EVP_MD_CTX_free(ctx);
    EVP_PKEY_free(key);
  }
  return absl::StrCat(signing_input, ".", absl::WebSafeBase64Escape(signature));
}

void TokenIssuer::Serve() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    Answer(fd);
    ::close(fd);
  }
}

void TokenIssuer::Answer(int fd) {
  // One request per connection; the request head is all that matters.
  std::string head;
  char buf[4096];
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (!absl::StrContains(head, "\r\n\r\n") && head.size() < 64 * 1024 && absl::Now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    head.append(buf, static_cast<size_t>(n));
  }
  std::vector<std::string> lines = absl::StrSplit(head, "\r\n");
  std::vector<std::string> request_line = absl::StrSplit(lines.empty() ? "" : lines[0], ' ');
  if (request_line.size() < 2 || request_line[0] != "GET") return Reply(fd, 405, "Method Not Allowed", "{}");
  std::string credentials;
  for (size_t i = 1; i < lines.size(); ++i) {
    absl::string_view line = lines[i];
    if (absl::StartsWithIgnoreCase(line, "authorization:")) {
      line.remove_prefix(std::strlen("authorization:"));
      line = absl::StripAsciiWhitespace(line);
      if (absl::ConsumePrefix(&line, "Basic ")) absl::Base64Unescape(line, &credentials);
    }
  }
  if (credentials != absl::StrCat(options_.username, ":", options_.password)) {
    ++refused_;
    return Reply(fd, 401, "Unauthorized", R"({"details":"wrong credentials"})");
  }
  std::pair<std::string, std::string> path_query = absl::StrSplit(request_line[1], absl::MaxSplits('?', 1));
  if (path_query.first != "/token") return Reply(fd, 404, "Not Found", "{}");
  std::string service;
  nlohmann::json access = nlohmann::json::array();
  for (absl::string_view param : absl::StrSplit(path_query.second, '&', absl::SkipEmpty())) {
    std::pair<std::string, std::string> kv = absl::StrSplit(param, absl::MaxSplits('=', 1));
    const std::string value = UrlDecode(kv.second);
    if (kv.first == "service") service = value;
    if (kv.first != "scope") continue;
    // `type:name:actions`, several separated by spaces.
    for (absl::string_view scope : absl::StrSplit(value, ' ', absl::SkipEmpty())) {
      {
        absl::MutexLock lock(&mu_);
        scopes_.emplace_back(scope);
      }
      const size_t first = scope.find(':');
      const size_t last = scope.rfind(':');
      if (first == absl::string_view::npos || first == last) continue;
      std::vector<std::string> actions = absl::StrSplit(scope.substr(last + 1), ',');
      access.push_back({{"type", std::string(scope.substr(0, first))},
                        {"name", std::string(scope.substr(first + 1, last - first - 1))},
                        {"actions", actions}});
    }
  }
  if (service != options_.service) return Reply(fd, 400, "Bad Request", R"({"details":"unknown service"})");
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  const int lifetime = expires_in_.load();
  const nlohmann::json claims = {{"iss", options_.issuer},
                                 {"sub", options_.username},
                                 {"aud", options_.service},
                                 {"exp", now + lifetime},
                                 {"nbf", now - 1},
                                 {"iat", now},
                                 {"jti", absl::StrCat("kiln-test-", issued_.load(), "-", now)},
                                 {"access", access}};
  const std::string token = Sign(claims.dump());
  ++issued_;
  Reply(fd, 200, "OK", nlohmann::json{{"token", token}, {"access_token", token}, {"expires_in", lifetime}}.dump());
}

}  // namespace kiln::testing
