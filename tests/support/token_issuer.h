// TokenIssuer: the token service of a registry that uses `auth: token`, for
// tests. It answers `GET /token?service=…&scope=…` on 127.0.0.1 with a JWT
// signed (RS256) by a key whose certificate chains to a CA made here; the
// registry is given that CA (`rootcertbundle`) and checks every token itself.
// Basic credentials are required; every requested scope is granted.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "tests/support/test_util.h"

namespace kiln::testing {

class TokenIssuer {
 public:
  struct Options {
    std::string username;
    std::string password;
    std::string service = "kiln-test-registry";
    std::string issuer = "kiln-test-issuer";
    int expires_in_seconds = 300;  // What the answer says; also the JWT's exp.
  };
  static absl::StatusOr<std::unique_ptr<TokenIssuer>> Start(const Options& options);
  ~TokenIssuer();

  std::string realm() const;  // http://127.0.0.1:PORT/token
  const std::string& service() const { return options_.service; }
  const std::string& issuer() const { return options_.issuer; }
  // The CA the registry must trust: a file the registry reads at start.
  std::string root_bundle() const { return dir_.Sub("bundle.crt"); }

  // A new CA and signing key, written to root_bundle(); tokens issued before
  // stop verifying once the registry restarts with the new bundle.
  absl::Status Rotate();

  // For tokens issued from now on.
  void set_expires_in(int seconds) { expires_in_ = seconds; }

  int tokens_issued() const { return issued_.load(); }
  int refusals() const { return refused_.load(); }
  std::vector<std::string> scopes_requested() const;

 private:
  TokenIssuer() = default;
  absl::Status MakeKeys();
  void Serve();
  void Answer(int fd);
  std::string Sign(const std::string& claims);

  Options options_;
  TempDir dir_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> expires_in_{300};
  std::atomic<int> issued_{0};
  std::atomic<int> refused_{0};
  std::thread server_;
  mutable absl::Mutex mu_;
  std::string key_pem_ ABSL_GUARDED_BY(mu_);   // The signing key.
  std::string cert_der_ ABSL_GUARDED_BY(mu_);  // Its certificate, for x5c.
  std::vector<std::string> scopes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln::testing
