// LocalSshd: OpenSSH's sshd on 127.0.0.1 and a port picked here, letting one
// client key in as root with a forced command (as a gateway host's
// authorized_keys does: `command="…",restrict KEY`). Nix reaches it as
// ssh://root@127.0.0.1 with NixSshOpts() in NIX_SSHOPTS. Stopped on
// destruction.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln::testing {

class LocalSshd {
 public:
  static absl::StatusOr<std::unique_ptr<LocalSshd>> Start(const std::string& forced_command);
  ~LocalSshd();

  int port() const { return port_; }
  // NIX_SSHOPTS for a client: its key, the port, no host-key prompts.
  std::string NixSshOpts() const;
  std::string StoreUri() const { return "ssh://root@127.0.0.1"; }
  std::string LogText() const;

 private:
  LocalSshd() = default;
  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  int port_ = 0;
};

}  // namespace kiln::testing
