#include "tests/support/local_registry.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"

namespace kiln::testing {

absl::StatusOr<int> FreeLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  if (port <= 0) return absl::InternalError("no free port on 127.0.0.1");
  return port;
}

absl::StatusOr<std::unique_ptr<LocalRegistry>> LocalRegistry::Start(const Options& options) {
  auto registry = std::unique_ptr<LocalRegistry>(new LocalRegistry());
  absl::StatusOr<int> port = FreeLoopbackPort();
  if (!port.ok()) return port.status();
  registry->address_ = absl::StrCat("127.0.0.1:", *port);
  std::string config = absl::StrCat(
      "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: ", registry->dir_.Sub("data"),
      "\n  delete:\n    enabled: true\nhttp:\n  addr: ", registry->address_, "\n");
  if (!options.username.empty()) {
    // The registry accepts bcrypt hashes only; the lowest cost keeps every
    // request of the tests fast (the registry checks each one).
    ProcessSpec hash;
    hash.argv = {"python3", "-c",
                 "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
                 options.password};
    absl::StatusOr<CommandResult> hashed = RunCommand(hash);
    if (!hashed.ok() || !hashed->exit.Success()) return absl::InternalError("cannot hash the test password");
    WriteFileOrDie(registry->dir_.Sub("htpasswd"),
                   absl::StrCat(options.username, ":", absl::StripAsciiWhitespace(hashed->stdout_data), "\n"));
    absl::StrAppend(&config, "auth:\n  htpasswd:\n    realm: kiln-test\n    path: ", registry->dir_.Sub("htpasswd"),
                    "\n");
  }
  if (options.token) {
    absl::StrAppend(&config, "auth:\n  token:\n    realm: ", options.token->realm,
                    "\n    service: ", options.token->service, "\n    issuer: ", options.token->issuer,
                    "\n    rootcertbundle: ", options.token->root_bundle, "\n");
  }
  if (options.tls) {
    // A CA and a server certificate for 127.0.0.1, with the openssl CLI.
    const std::string ca = registry->dir_.Sub("ca");
    WriteFileOrDie(ca + "/san.cnf", "subjectAltName=IP:127.0.0.1\n");
    const std::vector<std::vector<std::string>> steps = {
        {"openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
         ca + "/ca.key", "-out", ca + "/ca.crt", "-days", "2", "-subj", "/CN=kiln-test-ca"},
        {"openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
         registry->dir_.Sub("server.key"), "-out", registry->dir_.Sub("server.csr"), "-subj", "/CN=127.0.0.1"},
        {"openssl", "x509", "-req", "-in", registry->dir_.Sub("server.csr"), "-CA", ca + "/ca.crt", "-CAkey",
         ca + "/ca.key", "-CAcreateserial", "-out", registry->dir_.Sub("server.crt"), "-days", "2", "-extfile",
         ca + "/san.cnf"},
    };
    for (const auto& argv : steps) {
      ProcessSpec step;
      step.argv = argv;
      absl::StatusOr<CommandResult> r = RunCommand(step);
      if (!r.ok() || !r->exit.Success()) {
        return absl::InternalError(absl::StrCat("openssl failed: ", r.ok() ? r->stderr_data : r.status().message()));
      }
    }
    // skopeo --cert-dir reads every *.crt there as a CA; the key stays out.
    std::filesystem::rename(ca + "/ca.key", registry->dir_.Sub("ca.key"));
    // Under `http:`, right after its `addr:` line.
    const std::string addr_line = absl::StrCat("  addr: ", registry->address_, "\n");
    config.replace(config.find(addr_line), addr_line.size(),
                   absl::StrCat(addr_line, "  tls:\n    certificate: ", registry->dir_.Sub("server.crt"),
                                "\n    key: ", registry->dir_.Sub("server.key"), "\n"));
    registry->tls_ = true;
  }
  WriteFileOrDie(registry->dir_.Sub("config.yml"), config);
  if (absl::Status s = registry->Run(); !s.ok()) return s;
  return registry;
}

absl::Status LocalRegistry::Run() {
  auto daemon =
      Daemon::Start({"/usr/bin/docker-registry", "serve", dir_.Sub("config.yml")}, dir_.Sub("registry.log"), {});
  if (!daemon.ok()) return daemon.status();
  daemon_ = *std::move(daemon);
  // Ready when /v2/ answers (200, or 401 behind auth).
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (absl::Now() < deadline) {
    ProcessSpec probe;
    probe.argv = {"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"};
    if (tls_) probe.argv.insert(probe.argv.end(), {"--cacert", ca_file()});
    probe.argv.push_back(absl::StrCat(tls_ ? "https://" : "http://", address_, "/v2/"));
    absl::StatusOr<CommandResult> r = RunCommand(probe, "", absl::Seconds(5));
    if (r.ok() && (r->stdout_data == "200" || r->stdout_data == "401")) return absl::OkStatus();
    absl::SleepFor(absl::Milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat("docker-registry did not start: ", LogText()));
}

absl::Status LocalRegistry::Restart() {
  Stop();
  return Run();
}

std::string LocalRegistry::LogText() const { return ReadFileOrDie(dir_.Sub("registry.log")); }

void LocalRegistry::Stop() {
  if (daemon_) {
    daemon_->Kill(SIGTERM);
    daemon_->WaitExit(5000);
    daemon_.reset();
  }
}

LocalRegistry::~LocalRegistry() { Stop(); }

std::string DockerAuthConfig(const std::string& registry, const std::string& user, const std::string& password) {
  return nlohmann::json{{"auths", {{registry, {{"auth", absl::Base64Escape(absl::StrCat(user, ":", password))}}}}}}
      .dump();
}

}  // namespace kiln::testing
