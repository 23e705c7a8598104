// LocalRegistry: Debian's docker-registry (a real OCI distribution server)
// on 127.0.0.1 and a port picked here, storing into a temporary directory,
// optionally behind htpasswd (bcrypt) Basic auth or token auth. Stopped on destruction.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln::testing {

class LocalRegistry {
 public:
  struct Options {
    std::string username;  // Empty: no auth.
    std::string password;
    // Serve HTTPS with a certificate for 127.0.0.1 signed by a CA made here
    // (ca_file()).
    bool tls = false;
    // `auth: token`: clients get tokens from `realm`, signed by a key that
    // chains to the CA in `root_bundle` (see TokenIssuer). Re-read on Restart.
    struct Token {
      std::string realm, service, issuer, root_bundle;
    };
    std::optional<Token> token = std::nullopt;
  };
  static absl::StatusOr<std::unique_ptr<LocalRegistry>> Start(const Options& options);
  ~LocalRegistry();

  const std::string& address() const { return address_; }  // 127.0.0.1:PORT
  std::string ca_file() const { return dir_.Sub("ca/ca.crt"); }
  std::string ca_dir() const { return dir_.Sub("ca"); }  // For skopeo --cert-dir.
  std::string LogText() const;
  void Stop();
  // Starts it again on the same address with the same storage.
  absl::Status Restart();

 private:
  LocalRegistry() = default;
  absl::Status Run();  // Starts the daemon and waits until it answers.
  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::string address_;
  bool tls_ = false;
};

// A port on 127.0.0.1 that was free a moment ago.
absl::StatusOr<int> FreeLoopbackPort();

// A docker-style config.json giving `user`:`password` for `registry`, as
// workers read with --registry-auth-file.
std::string DockerAuthConfig(const std::string& registry, const std::string& user, const std::string& password);

}  // namespace kiln::testing
