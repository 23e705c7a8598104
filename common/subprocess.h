// Running child processes without a shell.
//
// RunCommand runs one program to completion and captures its output.
// ProcessSupervisor runs many long-lived children at once from a single poll
// thread: it splits their stderr into lines as they come, collects stdout, and
// reports each exit. Every child is the leader of its own process group, so
// Kill() ends the whole tree a build spawned, not only the first process.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace kiln {

// pipe(2) with both ends close-on-exec (and non-blocking if asked): pipe2
// on Linux, pipe + fcntl where there is none (macOS, for the CLI).
absl::Status MakePipe(int fds[2], bool nonblocking = false);

struct ProcessSpec {
  std::vector<std::string> argv;  // argv[0] is looked up in PATH.
  // Extra "NAME=value" entries layered over the parent's environment.
  std::vector<std::string> extra_env;
  std::string cwd;  // Empty: inherit.
};

struct ExitInfo {
  int exit_code = -1;  // -1 when killed by a signal.
  int signal = 0;
  bool Success() const { return exit_code == 0; }
  std::string ToString() const;
};

struct CommandResult {
  ExitInfo exit;
  std::string stdout_data;
  std::string stderr_data;
};

struct Spawned {
  pid_t pid = -1;
  int stdin_fd = -1;  // -1 unless asked for.
  int stdout_fd = -1;
  int stderr_fd = -1;  // -1 with stderr_to_null.
};

// Spawns `spec` as the leader of a new process group, with pipes for its
// standard streams (close-on-exec, blocking). No shell is involved: argv
// goes to execvp as it is. The caller owns the descriptors and the child.
absl::StatusOr<Spawned> SpawnWithPipes(const ProcessSpec& spec, bool want_stdin, bool stderr_to_null = false);

// Runs `spec` to completion, feeding it `stdin_data`. Output beyond
// `max_output` bytes per stream is discarded. After `timeout` the process group
// is killed and DeadlineExceeded is returned.
absl::StatusOr<CommandResult> RunCommand(const ProcessSpec& spec, absl::string_view stdin_data = "",
                                         absl::Duration timeout = absl::Minutes(10), size_t max_output = 64 << 20);

class ProcessSupervisor {
 public:
  using ProcessId = uint64_t;
  // Called on the supervisor thread for each stderr line (without '\n').
  using LineCallback = absl::AnyInvocable<void(absl::string_view line)>;
  // Called once on the supervisor thread after the child exited and both its
  // streams closed. `stdout_data` is capped at `kMaxStdout`.
  using ExitCallback = absl::AnyInvocable<void(ExitInfo exit, std::string stdout_data) &&>;

  static constexpr size_t kMaxLineBytes = 64 << 10;
  static constexpr size_t kMaxStdout = 16 << 20;

  // `ledger_dir` (optional): a file per running child (named by its pid,
  // holding its start time) is kept there, so that after this process dies
  // without cleaning up (SIGKILL, the OOM killer) the next one can stop what
  // it left running: see StopLeftovers.
  explicit ProcessSupervisor(std::string ledger_dir = "");
  // Kills every remaining child (and its group) and waits for them.
  ~ProcessSupervisor();

  // Stops the process groups named in `ledger_dir` whose leader still runs
  // (the same process: its start time matches): SIGTERM, then SIGKILL for
  // those still there after `grace`. Empties the ledger. Returns how many it
  // stopped. Linux only (elsewhere: 0).
  static int StopLeftovers(const std::string& ledger_dir, absl::Duration grace);
  // Stops, likewise, the process groups whose leader runs `program` (by base
  // name) in a directory inside `dir`: children a process was killed while
  // starting, before it could list them in its ledger. Linux only.
  static int StopProcessesIn(const std::string& dir, const std::string& program, absl::Duration grace);

  ProcessSupervisor(const ProcessSupervisor&) = delete;
  ProcessSupervisor& operator=(const ProcessSupervisor&) = delete;

  // Thread-safe. Callbacks must not block; they may call Kill().
  absl::StatusOr<ProcessId> Spawn(const ProcessSpec& spec, LineCallback on_line, ExitCallback on_exit)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Sends SIGKILL to the child's process group. Unknown ids are ignored.
  void Kill(ProcessId id) ABSL_LOCKS_EXCLUDED(mu_);

  // Sends SIGTERM to the child's process group, then SIGKILL if it has not
  // exited after `grace`. Programs that start their own sessions (Nix runs
  // each builder under setsid) need the chance to stop those themselves.
  // False when the child had already exited (or the id is unknown).
  bool Terminate(ProcessId id, absl::Duration grace) ABSL_LOCKS_EXCLUDED(mu_);

  size_t Running() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // SIGKILL for the groups of `stopping` whose leader outlives `grace`.
  static int TerminateGroups(const std::vector<pid_t>& stopping, absl::Duration grace);

  struct Child;
  void Loop();
  void Wake();

  const std::string ledger_dir_;
  mutable absl::Mutex mu_;
  std::map<ProcessId, std::shared_ptr<Child>> children_ ABSL_GUARDED_BY(mu_);
  ProcessId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  int wake_fds_[2] = {-1, -1};
  std::thread thread_;
};

}  // namespace kiln
