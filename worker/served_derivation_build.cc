#include "worker/served_derivation_build.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "common/subprocess.h"

namespace kiln {
namespace {

// What the child's last lines of stderr said, for an error.
constexpr size_t kTailBytes = 2048;

ProcessSpec NixStore(const ServedDerivationNix& nix, std::vector<std::string> args) {
  ProcessSpec spec;
  spec.argv = {nix.nix_store};
  for (const auto& [name, value] : nix.options) spec.argv.insert(spec.argv.end(), {"--option", name, value});
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  return spec;
}

absl::Status WriteAll(int fd, absl::string_view bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return absl::UnavailableError("nix-store --serve stopped reading");
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServeBuildResult> BuildServedDerivation(const ServedDerivationNix& nix, const std::string& drv_path,
                                                       const ServeDerivation& drv, const ServeBuildOptions& options,
                                                       absl::FunctionRef<void(absl::string_view line)> log_line) {
  if (!drv.input_srcs.empty()) {
    std::vector<std::string> args = {"--realise"};
    args.insert(args.end(), drv.input_srcs.begin(), drv.input_srcs.end());
    ASSIGN_OR_RETURN(CommandResult realised, RunCommand(NixStore(nix, args), "", absl::Hours(1)));
    if (!realised.exit.Success()) {
      ServeBuildResult r;
      r.status = ServeBuildStatus::kMiscFailure;
      const std::string& err = realised.stderr_data;
      r.error_msg =
          absl::StrCat("the inputs of ", drv_path, " cannot be realised on this worker: ",
                       absl::StripAsciiWhitespace(err.size() > kTailBytes ? err.substr(err.size() - kTailBytes) : err));
      return r;
    }
  }
  ASSIGN_OR_RETURN(Spawned child, SpawnWithPipes(NixStore(nix, {"--serve", "--write"}), /*want_stdin=*/true));
  if (nix.on_started) nix.on_started(child.pid);
  // The log, on its own thread: the child writes it while the result is
  // awaited on stdout.
  std::thread stderr_reader([fd = child.stderr_fd, &log_line] {
    std::string pending;
    char buf[16384];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      pending.append(buf, static_cast<size_t>(n));
      size_t start = 0;
      for (size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1) {
        log_line(absl::string_view(pending).substr(start, nl - start));
      }
      pending.erase(0, start);
    }
    if (!pending.empty()) log_line(pending);
  });
  ServeWriter session;
  session.U64(kServeMagic1).U64(kServeProtocolVersion);
  session.U64(static_cast<uint64_t>(ServeCommand::kBuildDerivation)).String(drv_path);
  WriteServeDerivation(session, drv);
  WriteServeBuildOptions(session, options, kServeProtocolVersion);
  ServeReader reader([fd = child.stdout_fd](char* buf, size_t size) -> absl::StatusOr<size_t> {
    for (;;) {
      const ssize_t n = ::read(fd, buf, size);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return absl::UnavailableError("cannot read from nix-store --serve");
      return static_cast<size_t>(n);
    }
  });
  absl::StatusOr<ServeBuildResult> result = [&]() -> absl::StatusOr<ServeBuildResult> {
    RETURN_IF_ERROR(WriteAll(child.stdin_fd, session.data()));
    ASSIGN_OR_RETURN(uint64_t magic, reader.U64());
    if (magic != kServeMagic2) return absl::DataLossError("nix-store --serve: not the serve protocol");
    ASSIGN_OR_RETURN(uint64_t version, reader.U64());
    // Both ends speak the lower version.
    return ReadServeBuildResult(reader, std::min(version, kServeProtocolVersion));
  }();
  if (!result.ok()) ::kill(-child.pid, SIGKILL);
  ::close(child.stdin_fd);  // The end of the session: the child exits.
  ::close(child.stdout_fd);
  stderr_reader.join();
  ::close(child.stderr_fd);
  int wstatus = 0;
  while (::waitpid(child.pid, &wstatus, 0) < 0 && errno == EINTR) {}
  if (!result.ok()) return WithContext(result.status(), absl::StrCat("building ", drv_path, " with nix-store --serve"));
  return result;
}

}  // namespace kiln
