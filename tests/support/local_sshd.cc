#include "tests/support/local_sshd.h"

#include <csignal>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "tests/support/local_registry.h"

namespace kiln::testing {

absl::StatusOr<std::unique_ptr<LocalSshd>> LocalSshd::Start(const std::string& forced_command) {
  auto sshd = std::unique_ptr<LocalSshd>(new LocalSshd());
  const TempDir& d = sshd->dir_;
  for (const char* key : {"host", "client"}) {
    ProcessSpec keygen;
    keygen.argv = {"ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d.Sub(key)};
    absl::StatusOr<CommandResult> r = RunCommand(keygen);
    if (!r.ok() || !r->exit.Success()) return absl::InternalError("ssh-keygen failed");
  }
  WriteFileOrDie(d.Sub("authorized_keys"),
                 absl::StrCat("command=\"", forced_command, "\",restrict ", ReadFileOrDie(d.Sub("client.pub"))));
  std::filesystem::permissions(d.Sub("authorized_keys"),
                               std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  absl::StatusOr<int> port = FreeLoopbackPort();
  if (!port.ok()) return port.status();
  sshd->port_ = *port;
  WriteFileOrDie(d.Sub("sshd_config"),
                 absl::StrCat("Port ", *port, "\nListenAddress 127.0.0.1\nHostKey ", d.Sub("host"),
                              "\nAuthorizedKeysFile ", d.Sub("authorized_keys"),
                              "\nPermitRootLogin forced-commands-only\nPasswordAuthentication no\n"
                              "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile ",
                              d.Sub("sshd.pid"), "\n"));
  std::error_code ec;
  std::filesystem::create_directories("/run/sshd", ec);  // Its privilege separation directory.
  // -D: in the foreground, so the test owns the process; -e: log to stderr.
  auto daemon = Daemon::Start({"/usr/sbin/sshd", "-D", "-e", "-f", d.Sub("sshd_config")}, d.Sub("sshd.log"), {});
  if (!daemon.ok()) return daemon.status();
  sshd->daemon_ = *std::move(daemon);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  for (;;) {
    ProcessSpec probe;
    probe.argv = {"ssh-keyscan", "-p", absl::StrCat(*port), "127.0.0.1"};
    absl::StatusOr<CommandResult> r = RunCommand(probe, "", absl::Seconds(5));
    if (r.ok() && r->exit.Success() && !r->stdout_data.empty()) return sshd;
    if (absl::Now() > deadline)
      return absl::DeadlineExceededError(absl::StrCat("sshd did not start: ", sshd->LogText()));
    absl::SleepFor(absl::Milliseconds(50));
  }
}

std::string LocalSshd::NixSshOpts() const {
  return absl::StrCat("-i ", dir_.Sub("client"), " -p ", port_,
                      " -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR");
}

std::string LocalSshd::LogText() const { return ReadFileOrDie(dir_.Sub("sshd.log")); }

LocalSshd::~LocalSshd() {
  if (daemon_) {
    daemon_->Kill(SIGTERM);
    daemon_->WaitExit(5000);
  }
}

}  // namespace kiln::testing
