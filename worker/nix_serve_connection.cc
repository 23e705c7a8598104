#include "worker/nix_serve_connection.h"

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/serve_protocol.h"
#include "common/status_macros.h"
#include "common/subprocess.h"

namespace kiln {
namespace {

// 2.5: path infos carry narHash, ca and signatures (minor ≥ 4).
constexpr uint64_t kClientVersion = (2 << 8) | 5;
constexpr uint64_t kMaxString = 1 << 20;
constexpr uint64_t kMaxSet = 1 << 22;

}  // namespace

NixServeConnection::~NixServeConnection() {
  absl::MutexLock lock(&mu_);
  StopLocked();
}

void NixServeConnection::StopLocked() {
  if (to_child_ >= 0) ::close(to_child_);
  if (from_child_ >= 0) ::close(from_child_);
  to_child_ = from_child_ = -1;
  if (pid_ > 0) {
    ::kill(-pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  pid_ = -1;
}

absl::Status NixServeConnection::StartLocked() {
  ProcessSpec spec;
  spec.argv = {nix_store_binary_};
  for (const auto& [name, value] : options_) spec.argv.insert(spec.argv.end(), {"--option", name, value});
  spec.argv.push_back("--serve");
  ASSIGN_OR_RETURN(Spawned child, SpawnWithPipes(spec, /*want_stdin=*/true, /*stderr_to_null=*/true));
  pid_ = child.pid;
  to_child_ = child.stdin_fd;
  from_child_ = child.stdout_fd;
  RETURN_IF_ERROR(Write(ServeWriter().U64(kServeMagic1).data()));
  const absl::Time deadline = absl::Now() + deadline_;
  ASSIGN_OR_RETURN(uint64_t magic, ReadU64(deadline));
  if (magic != kServeMagic2) return absl::DataLossError("nix-store --serve: not the serve protocol");
  ASSIGN_OR_RETURN(uint64_t version, ReadU64(deadline));
  if ((version >> 8) != 2 || (version & 0xff) < 4) {
    return absl::FailedPreconditionError(absl::StrCat("nix-store --serve speaks version ", version >> 8, ".",
                                                      version & 0xff, "; 2.4 or later is needed"));
  }
  return Write(ServeWriter().U64(kClientVersion).data());
}

absl::Status NixServeConnection::Write(const std::string& bytes) {
  size_t at = 0;
  while (at < bytes.size()) {
    const ssize_t n = ::write(to_child_, bytes.data() + at, bytes.size() - at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return absl::UnavailableError(absl::StrCat("nix-store --serve: write: ", std::strerror(errno)));
    at += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status NixServeConnection::Read(char* buf, size_t n, absl::Time deadline) {
  while (n > 0) {
    pollfd p{from_child_, POLLIN, 0};
    const int left_ms = static_cast<int>(std::max<int64_t>(0, absl::ToInt64Milliseconds(deadline - absl::Now())));
    const int ready = ::poll(&p, 1, left_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) return absl::DeadlineExceededError("nix-store --serve did not answer in time");
    const ssize_t got = ::read(from_child_, buf, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return absl::UnavailableError("nix-store --serve ended");
    buf += got;
    n -= static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> NixServeConnection::ReadU64(absl::Time deadline) {
  unsigned char b[8];
  RETURN_IF_ERROR(Read(reinterpret_cast<char*>(b), 8, deadline));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
  return n;
}

absl::StatusOr<std::string> NixServeConnection::ReadString(absl::Time deadline) {
  ASSIGN_OR_RETURN(uint64_t size, ReadU64(deadline));
  if (size > kMaxString) return absl::DataLossError("nix-store --serve: a string too long");
  std::string s(size + (8 - size % 8) % 8, '\0');
  RETURN_IF_ERROR(Read(s.data(), s.size(), deadline));
  s.resize(size);
  return s;
}

absl::StatusOr<std::vector<std::string>> NixServeConnection::ReadStrings(absl::Time deadline) {
  ASSIGN_OR_RETURN(uint64_t count, ReadU64(deadline));
  if (count > kMaxSet) return absl::DataLossError("nix-store --serve: a set too large");
  std::vector<std::string> out;
  out.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    ASSIGN_OR_RETURN(std::string s, ReadString(deadline));
    out.push_back(std::move(s));
  }
  return out;
}

absl::StatusOr<std::vector<kiln::v1::PathInfo>> NixServeConnection::AskLocked(const std::vector<std::string>& roots) {
  if (pid_ < 0) RETURN_IF_ERROR(StartLocked());
  const absl::Time deadline = absl::Now() + deadline_;
  // Not the outputs of derivations.
  RETURN_IF_ERROR(
      Write(ServeWriter().U64(static_cast<uint64_t>(ServeCommand::kQueryClosure)).U64(0).Strings(roots).data()));
  ASSIGN_OR_RETURN(std::vector<std::string> closure, ReadStrings(deadline));
  RETURN_IF_ERROR(
      Write(ServeWriter().U64(static_cast<uint64_t>(ServeCommand::kQueryPathInfos)).Strings(closure).data()));
  std::vector<kiln::v1::PathInfo> infos;
  infos.reserve(closure.size());
  for (;;) {
    ASSIGN_OR_RETURN(std::string path, ReadString(deadline));
    if (path.empty()) break;
    if (infos.size() >= closure.size()) return absl::DataLossError("nix-store --serve: more infos than asked for");
    kiln::v1::PathInfo& info = infos.emplace_back();
    info.set_store_path(path);
    ASSIGN_OR_RETURN(std::string deriver, ReadString(deadline));
    info.set_deriver(deriver);
    ASSIGN_OR_RETURN(std::vector<std::string> refs, ReadStrings(deadline));
    for (std::string& r : refs) info.add_references(std::move(r));
    ASSIGN_OR_RETURN(uint64_t download_size, ReadU64(deadline));
    (void)download_size;
    ASSIGN_OR_RETURN(uint64_t nar_size, ReadU64(deadline));
    info.set_nar_size(nar_size);
    ASSIGN_OR_RETURN(std::string nar_hash, ReadString(deadline));
    info.set_nar_hash(nar_hash);
    ASSIGN_OR_RETURN(std::string ca, ReadString(deadline));
    info.set_ca(ca);
    ASSIGN_OR_RETURN(std::vector<std::string> sigs, ReadStrings(deadline));
    (void)sigs;
  }
  // A root that is not valid has no closure: Nix answers with an error
  // (the child ends) or leaves it out.
  for (const std::string& root : roots) {
    bool found = false;
    for (const kiln::v1::PathInfo& info : infos) found |= info.store_path() == root;
    if (!found) return absl::NotFoundError(absl::StrCat(root, " is not valid in the local store"));
  }
  return infos;
}

absl::StatusOr<std::vector<kiln::v1::PathInfo>> NixServeConnection::ClosureInfos(
    const std::vector<std::string>& roots) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> infos = AskLocked(roots);
  // Any failure may leave the stream mid-answer: the next question starts
  // a new child.
  if (!infos.ok()) StopLocked();
  return infos;
}

}  // namespace kiln
