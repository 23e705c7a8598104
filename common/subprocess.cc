#include "common/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/syscall.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/source_tree.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

extern char** environ;

namespace kiln {
namespace {

absl::Status ErrnoStatus(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

void CloseFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

ExitInfo DecodeWaitStatus(int status) {
  ExitInfo info;
  if (WIFEXITED(status)) {
    info.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    info.signal = WTERMSIG(status);
  }
  return info;
}

// Builds the environment: the parent's, with `extra` entries replacing
// variables of the same name.
std::vector<std::string> BuildEnv(const std::vector<std::string>& extra) {
  std::map<std::string, std::string> vars;
  for (char** e = environ; e && *e; ++e) {
    absl::string_view kv(*e);
    auto eq = kv.find('=');
    if (eq == absl::string_view::npos) continue;
    vars[std::string(kv.substr(0, eq))] = std::string(kv);
  }
  for (const auto& kv : extra) {
    auto eq = kv.find('=');
    vars[kv.substr(0, eq)] = kv;
  }
  std::vector<std::string> out;
  out.reserve(vars.size());
  for (auto& [_, kv] : vars) out.push_back(std::move(kv));
  return out;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

}  // namespace

absl::StatusOr<Spawned> SpawnWithPipes(const ProcessSpec& spec, bool want_stdin, bool stderr_to_null) {
  if (spec.argv.empty()) return absl::InvalidArgumentError("empty argv");
  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
  auto close_all = absl::MakeCleanup([&] {
    for (int* p : {in, out, err}) {
      CloseFd(p[0]);
      CloseFd(p[1]);
    }
  });
  if (want_stdin) {
    RETURN_IF_ERROR(MakePipe(in));
  }
  RETURN_IF_ERROR(MakePipe(out));
  if (!stderr_to_null) RETURN_IF_ERROR(MakePipe(err));

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  auto destroy_actions = absl::MakeCleanup([&] { posix_spawn_file_actions_destroy(&actions); });
  if (want_stdin) {
    posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
  } else {
    posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  }
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  if (stderr_to_null) {
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  } else {
    posix_spawn_file_actions_adddup2(&actions, err[1], STDERR_FILENO);
  }
  if (!spec.cwd.empty()) {
    posix_spawn_file_actions_addchdir_np(&actions, spec.cwd.c_str());
  }

  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  auto destroy_attr = absl::MakeCleanup([&] { posix_spawnattr_destroy(&attr); });
  // Own process group, and default signal handling, so a kill reaches the tree.
  sigset_t all, none;
  sigfillset(&all);
  sigemptyset(&none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

  std::vector<std::string> argv = spec.argv;
  std::vector<std::string> env = BuildEnv(spec.extra_env);
  auto c_argv = CStrings(argv);
  auto c_env = CStrings(env);
  pid_t pid = -1;
  int rc = ::posix_spawnp(&pid, c_argv[0], &actions, &attr, c_argv.data(), c_env.data());
  if (rc != 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot run '", spec.argv[0], "': ", std::strerror(rc)));
  }
  Spawned s;
  s.pid = pid;
  s.stdin_fd = std::exchange(in[1], -1);
  s.stdout_fd = std::exchange(out[0], -1);
  s.stderr_fd = std::exchange(err[0], -1);
  return s;
}

namespace {

void SetNonBlocking(int fd) {
  if (fd >= 0) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
}

}  // namespace

absl::Status MakePipe(int fds[2], bool nonblocking) {
#ifdef __linux__
  if (::pipe2(fds, O_CLOEXEC | (nonblocking ? O_NONBLOCK : 0)) != 0) return ErrnoStatus("pipe");
#else
  // Not atomic with a concurrent fork+exec elsewhere; the CLI (the only
  // user off Linux) spawns from one thread.
  if (::pipe(fds) != 0) return ErrnoStatus("pipe");
  for (int i = 0; i < 2; ++i) {
    ::fcntl(fds[i], F_SETFD, FD_CLOEXEC);
    if (nonblocking) ::fcntl(fds[i], F_SETFL, ::fcntl(fds[i], F_GETFL) | O_NONBLOCK);
  }
#endif
  return absl::OkStatus();
}

std::string ExitInfo::ToString() const {
  if (signal != 0) return absl::StrCat("killed by signal ", signal);
  return absl::StrCat("exit code ", exit_code);
}

absl::StatusOr<CommandResult> RunCommand(const ProcessSpec& spec, absl::string_view stdin_data, absl::Duration timeout,
                                         size_t max_output) {
  absl::StatusOr<Spawned> spawned = SpawnWithPipes(spec, /*want_stdin=*/true);
  if (!spawned.ok()) return spawned.status();
  Spawned s = *spawned;
  SetNonBlocking(s.stdin_fd);
  SetNonBlocking(s.stdout_fd);
  SetNonBlocking(s.stderr_fd);
  if (stdin_data.empty()) CloseFd(s.stdin_fd);

  CommandResult result;
  size_t written = 0;
  const absl::Time deadline = absl::Now() + timeout;
  bool timed_out = false;
  char buf[64 << 10];
  while (s.stdout_fd >= 0 || s.stderr_fd >= 0) {
    pollfd fds[3];
    int n = 0;
    int idx_in = -1, idx_out = -1, idx_err = -1;
    if (s.stdin_fd >= 0) {
      idx_in = n;
      fds[n++] = {s.stdin_fd, POLLOUT, 0};
    }
    if (s.stdout_fd >= 0) {
      idx_out = n;
      fds[n++] = {s.stdout_fd, POLLIN, 0};
    }
    if (s.stderr_fd >= 0) {
      idx_err = n;
      fds[n++] = {s.stderr_fd, POLLIN, 0};
    }
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      timed_out = true;
      ::kill(-s.pid, SIGKILL);
      break;
    }
    int ms = static_cast<int>(absl::ToInt64Milliseconds(left)) + 1;
    int rc = ::poll(fds, n, ms);
    if (rc < 0 && errno != EINTR) break;
    if (rc <= 0) continue;
    if (idx_in >= 0 && fds[idx_in].revents) {
      ssize_t w = ::write(s.stdin_fd, stdin_data.data() + written, stdin_data.size() - written);
      if (w > 0) written += static_cast<size_t>(w);
      if (w < 0 && errno != EAGAIN) written = stdin_data.size();
      if (written >= stdin_data.size()) CloseFd(s.stdin_fd);
    }
    auto drain = [&](int idx, int& fd, std::string& sink) {
      if (idx < 0 || !fds[idx].revents) return;
      ssize_t r = ::read(fd, buf, sizeof buf);
      if (r > 0) {
        size_t room = max_output > sink.size() ? max_output - sink.size() : 0;
        sink.append(buf, std::min(room, static_cast<size_t>(r)));
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        CloseFd(fd);
      }
    };
    drain(idx_out, s.stdout_fd, result.stdout_data);
    drain(idx_err, s.stderr_fd, result.stderr_data);
  }
  CloseFd(s.stdin_fd);
  CloseFd(s.stdout_fd);
  CloseFd(s.stderr_fd);
  int status = 0;
  while (::waitpid(s.pid, &status, 0) < 0 && errno == EINTR) {}
  result.exit = DecodeWaitStatus(status);
  if (timed_out) {
    return absl::DeadlineExceededError(
        absl::StrCat("'", spec.argv[0], "' did not finish within ", absl::FormatDuration(timeout)));
  }
  return result;
}

// ---------------------------------------------------------------------------

struct ProcessSupervisor::Child {
  pid_t pid = -1;
  int stdout_fd = -1;
  int stderr_fd = -1;
  // Readable once the leader exits, so its exit is seen at once rather than
  // at the next poll timeout. -1 where the kernel has no pidfd_open (< 5.3).
  int pid_fd = -1;
  std::string stdout_data;
  std::string line_buf;
  // Written under the supervisor's mu_, read by the loop thread without it.
  bool exited = false;
  ExitInfo exit;
  absl::Time kill_at = absl::InfiniteFuture();  // Guarded by the supervisor's mu_.
  LineCallback on_line;
  ExitCallback on_exit;
};

namespace {

// The start time of process `pid` (clock ticks since boot, field 22 of
// /proc/PID/stat), or "" when it does not run. With the pid it names one
// process for good: a pid reused later starts at another time.
std::string ProcessStartTime(pid_t pid) {
#ifdef __linux__
  std::string stat;
  if (!ReadWholeFile(absl::StrCat("/proc/", pid, "/stat"), stat).ok()) return "";
  // The command name (field 2) is in parentheses and may hold anything.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return "";
  std::vector<absl::string_view> fields =
      absl::StrSplit(absl::string_view(stat).substr(close + 1), ' ', absl::SkipEmpty());
  // Fields from 3 on; the start time is the 22nd.
  if (fields.size() < 20) return "";
  return std::string(fields[19]);
#else
  (void)pid;
  return "";
#endif
}

std::string LedgerEntry(const std::string& dir, pid_t pid) { return absl::StrCat(dir, "/", pid); }

}  // namespace

int ProcessSupervisor::StopLeftovers(const std::string& ledger_dir, absl::Duration grace) {
  std::error_code ec;
  std::vector<pid_t> stopping;
  for (const auto& entry : std::filesystem::directory_iterator(ledger_dir, ec)) {
    int pid = 0;
    std::string started;
    // A recorded start time that is empty (the child was gone before it was
    // read) matches nothing; /proc is read once per entry.
    if (absl::SimpleAtoi(entry.path().filename().string(), &pid) && pid > 1 &&
        ReadWholeFile(entry.path().string(), started).ok() && !absl::StripAsciiWhitespace(started).empty() &&
        ProcessStartTime(pid) == absl::StripAsciiWhitespace(started)) {
      ::kill(-pid, SIGTERM);
      stopping.push_back(pid);
    }
    std::filesystem::remove(entry.path(), ec);
  }
  return TerminateGroups(stopping, grace);
}

int ProcessSupervisor::StopProcessesIn(const std::string& dir, const std::string& program, absl::Duration grace) {
  const std::string prefix = absl::StrCat(absl::StripSuffix(dir, "/"), "/");
  std::error_code ec;
  std::vector<pid_t> stopping;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    int pid = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid) || pid <= 1 || pid == ::getpid()) continue;
    std::error_code link_ec;
    const std::string cwd = std::filesystem::read_symlink(entry.path() / "cwd", link_ec).string();
    // Group leaders only (each child is one): their groups go with them.
    if (link_ec || !absl::StartsWith(cwd, prefix) || ::getpgid(pid) != pid) continue;
    std::string cmdline;
    if (!ReadWholeFile((entry.path() / "cmdline").string(), cmdline).ok()) continue;
    const std::string argv0 = cmdline.substr(0, cmdline.find('\0'));
    if (std::filesystem::path(argv0).filename() != std::filesystem::path(program).filename()) continue;
    ::kill(-pid, SIGTERM);
    stopping.push_back(pid);
  }
  return TerminateGroups(stopping, grace);
}

int ProcessSupervisor::TerminateGroups(const std::vector<pid_t>& stopping, absl::Duration grace) {
  // No longer our children: watch for them to go, then make sure.
  const absl::Time deadline = absl::Now() + grace;
  while (absl::Now() < deadline) {
    bool any = false;
    for (pid_t pid : stopping) any = any || ::kill(pid, 0) == 0;
    if (!any) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  for (pid_t pid : stopping) ::kill(-pid, SIGKILL);
  return static_cast<int>(stopping.size());
}

ProcessSupervisor::ProcessSupervisor(std::string ledger_dir) : ledger_dir_(std::move(ledger_dir)) {
  if (!ledger_dir_.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(ledger_dir_, ec);
  }
  if (!MakePipe(wake_fds_, /*nonblocking=*/true).ok()) std::abort();
  thread_ = std::thread([this] { Loop(); });
}

ProcessSupervisor::~ProcessSupervisor() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [_, child] : children_) ::kill(-child->pid, SIGKILL);
  }
  Wake();
  thread_.join();
  ::close(wake_fds_[0]);
  ::close(wake_fds_[1]);
}

void ProcessSupervisor::Wake() {
  char c = 1;
  (void)!::write(wake_fds_[1], &c, 1);
}

absl::StatusOr<ProcessSupervisor::ProcessId> ProcessSupervisor::Spawn(const ProcessSpec& spec, LineCallback on_line,
                                                                      ExitCallback on_exit) {
  absl::StatusOr<Spawned> spawned = SpawnWithPipes(spec, /*want_stdin=*/false);
  if (!spawned.ok()) return spawned.status();
  auto child = std::make_shared<Child>();
  child->pid = spawned->pid;
  child->stdout_fd = spawned->stdout_fd;
  child->stderr_fd = spawned->stderr_fd;
#ifdef SYS_pidfd_open
  child->pid_fd = static_cast<int>(::syscall(SYS_pidfd_open, spawned->pid, 0));
#endif
  SetNonBlocking(child->stdout_fd);
  SetNonBlocking(child->stderr_fd);
  child->on_line = std::move(on_line);
  child->on_exit = std::move(on_exit);
  if (!ledger_dir_.empty()) {
    // Best effort: a ledger that cannot be written only loses the clean-up
    // after a crash.
    if (std::FILE* f = std::fopen(LedgerEntry(ledger_dir_, child->pid).c_str(), "w")) {
      std::fputs(ProcessStartTime(child->pid).c_str(), f);
      std::fclose(f);
    }
  }
  ProcessId id;
  {
    absl::MutexLock lock(&mu_);
    id = next_id_++;
    children_[id] = child;
  }
  Wake();
  return id;
}

void ProcessSupervisor::Kill(ProcessId id) {
  absl::MutexLock lock(&mu_);
  auto it = children_.find(id);
  if (it != children_.end() && !it->second->exited) ::kill(-it->second->pid, SIGKILL);
}

bool ProcessSupervisor::Terminate(ProcessId id, absl::Duration grace) {
  absl::MutexLock lock(&mu_);
  auto it = children_.find(id);
  if (it == children_.end() || it->second->exited) return false;
  ::kill(-it->second->pid, SIGTERM);
  it->second->kill_at = absl::Now() + grace;
  return true;
}

size_t ProcessSupervisor::Running() const {
  absl::MutexLock lock(&mu_);
  return children_.size();
}

void ProcessSupervisor::Loop() {
  char buf[64 << 10];
  for (;;) {
    // Snapshot the children; only this thread reads their fds and buffers.
    std::vector<std::pair<ProcessId, std::shared_ptr<Child>>> live;
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      stopping = stopping_;
      live.assign(children_.begin(), children_.end());
    }
    if (stopping && live.empty()) return;
    {
      // Escalate terminations whose grace period ran out.
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      for (auto& [_, c] : live) {
        if (!c->exited && c->kill_at <= now) {
          ::kill(-c->pid, SIGKILL);
          c->kill_at = absl::InfiniteFuture();
        }
      }
    }

    std::vector<pollfd> fds;
    std::vector<std::pair<Child*, bool>> owners;  // (child, is_stderr)
    fds.push_back({wake_fds_[0], POLLIN, 0});
    owners.push_back({nullptr, false});
    for (auto& [_, c] : live) {
      if (c->stdout_fd >= 0) {
        fds.push_back({c->stdout_fd, POLLIN, 0});
        owners.push_back({c.get(), false});
      }
      if (c->stderr_fd >= 0) {
        fds.push_back({c->stderr_fd, POLLIN, 0});
        owners.push_back({c.get(), true});
      }
    }
    // Without a pidfd, a child whose streams closed is about to exit: look
    // again soon. The 100 ms otherwise bounds how late an exit is noticed
    // when a grandchild still holds the pipes open.
    bool exiting = false;
    for (auto& [_, c] : live) {
      if (c->exited) continue;
      if (c->pid_fd >= 0) {
        fds.push_back({c->pid_fd, POLLIN, 0});
        owners.push_back({nullptr, false});
      } else {
        exiting |= c->stdout_fd < 0 && c->stderr_fd < 0;
      }
    }
    int rc = ::poll(fds.data(), fds.size(), exiting ? 1 : 100);
    if (rc < 0 && errno != EINTR) continue;
    if (fds[0].revents) {
      while (::read(wake_fds_[0], buf, sizeof buf) > 0) {}
    }
    for (size_t i = 1; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      Child* c = owners[i].first;
      if (c == nullptr) continue;  // A pidfd: the reaping below handles it.
      bool is_stderr = owners[i].second;
      int& fd = is_stderr ? c->stderr_fd : c->stdout_fd;
      ssize_t r = ::read(fd, buf, sizeof buf);
      if (r > 0) {
        if (!is_stderr) {
          size_t room = kMaxStdout > c->stdout_data.size() ? kMaxStdout - c->stdout_data.size() : 0;
          c->stdout_data.append(buf, std::min(room, static_cast<size_t>(r)));
          continue;
        }
        absl::string_view chunk(buf, static_cast<size_t>(r));
        while (!chunk.empty()) {
          auto nl = chunk.find('\n');
          if (nl == absl::string_view::npos) {
            c->line_buf.append(chunk.data(), chunk.size());
            if (c->line_buf.size() >= kMaxLineBytes) {
              c->on_line(c->line_buf);
              c->line_buf.clear();
            }
            break;
          }
          c->line_buf.append(chunk.data(), nl);
          if (c->line_buf.size() > kMaxLineBytes) c->line_buf.resize(kMaxLineBytes);
          c->on_line(c->line_buf);
          c->line_buf.clear();
          chunk.remove_prefix(nl + 1);
        }
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        if (is_stderr && !c->line_buf.empty()) {
          c->on_line(c->line_buf);
          c->line_buf.clear();
        }
        CloseFd(fd);
      }
    }
    // Reap: once the leader exited, nothing of the build may outlive it.
    for (auto& [id, c] : live) {
      if (!c->exited) {
        // Peek without reaping: while the leader is a zombie its group id
        // cannot be reused, so killing the group hits only the build's tree.
        siginfo_t info{};
        if (::waitid(P_PID, static_cast<id_t>(c->pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
            info.si_pid == c->pid) {
          // Reaped under mu_: Kill and Terminate read `exited` under it, so
          // none can signal the group after its pid is free for reuse. The
          // leader is a zombie already, so waitpid returns at once.
          absl::MutexLock lock(&mu_);
          ::kill(-c->pid, SIGKILL);
          int status = 0;
          while (::waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {}
          c->exited = true;
          c->exit = DecodeWaitStatus(status);
          CloseFd(c->pid_fd);
        }
      }
      if (c->exited && c->stdout_fd < 0 && c->stderr_fd < 0) {
        if (!ledger_dir_.empty()) ::unlink(LedgerEntry(ledger_dir_, c->pid).c_str());
        {
          absl::MutexLock lock(&mu_);
          children_.erase(id);
        }
        std::move(c->on_exit)(c->exit, std::move(c->stdout_data));
      }
    }
  }
}

}  // namespace kiln
