// LocalFarm: a real coordinator and N real workers, started as processes from
// the built binaries, on 127.0.0.1 with ports picked by the kernel (port 0,
// read back from --ready-file). Nix runs offline (no substituters).
#pragma once

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/subprocess.h"
#include "tests/support/test_util.h"

namespace kiln::testing {

// A daemon process with its output in a log file; stopped on destruction
// (SIGTERM, SIGKILL after 10 s).
class Daemon {
 public:
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const std::vector<std::string>& argv,
                                                       const std::string& log_path,
                                                       const std::vector<std::string>& extra_env);
  ~Daemon();
  void Kill(int signal);
  // Waits (bounded) for the process to exit; true if it did.
  bool WaitExit(int timeout_ms);
  // SIGTERM, then waits up to `timeout_ms` for the exit; SIGKILL after
  // that. How it ended, or an error saying it did not stop in time.
  absl::StatusOr<ExitInfo> Stop(int timeout_ms);
  pid_t pid() const { return pid_; }
  // How the process ended, once it has been reaped.
  const std::optional<ExitInfo>& exit() const { return exit_; }

 private:
  pid_t pid_ = -1;
  std::optional<ExitInfo> exit_;
};

// Polls (at most 30 s) for a daemon's --ready-file, which appears once it
// serves; its JSON, or an error quoting the daemon's log.
absl::StatusOr<nlohmann::json> WaitForReadyFile(const std::string& path, const std::string& log);

// What `kiln build … --json` said, as a test reads it.
struct JsonBuildOutput {
  int exit_code = -1;
  nlohmann::json entry;  // The first entry of stdout's array; null if none.
  // Stdout, then the text of every stderr event (log lines, messages): what
  // a person would have read.
  std::string printed;
};
JsonBuildOutput ReadJsonBuild(const CommandResult& result);

// Environment for Nix in tests: offline, flakes on.
std::vector<std::string> NixTestEnv();

// `argv` as on a machine whose Nix store is `nix_dir` (bind-mounted at /nix
// in a mount namespace of its own, initialised first), with the tests' Nix
// environment and no build users: a client or builder with a store of its own.
ProcessSpec OnPrivateStore(const std::string& nix_dir, const std::vector<std::string>& argv);

// Where the logs of daemons that died badly are copied to:
// $KILN_KEPT_LOGS_DIR, else $TMPDIR/kiln-kept-logs, else /tmp/kiln-kept-logs.
std::string KeptLogsRoot();

// The daemons are stopped with SIGTERM when the farm goes (workers first);
// each must exit 0. A daemon that died during the test, exited otherwise or
// did not stop in time fails the test: the failure quotes the end of its log
// and names the directory under KeptLogsRoot() where every log of the farm
// was copied. Daemons the test killed itself (KillWorker, KillCoordinator
// with SIGKILL) are exempt; after a SIGTERM they too must exit 0.
class LocalFarm {
 public:
  explicit LocalFarm(int workers, int max_jobs_per_worker = 2);
  ~LocalFarm();

  // Each worker gets a Nix store of its own, as on real machines: it runs in
  // a mount namespace of its own with StoreDirOf(i) bind-mounted at /nix
  // (and Nix's build users off, which private stores cannot share). The
  // default for a farm of more than one worker; a farm of one that adds
  // more later must call this before Start() (AddWorker refuses a second
  // worker on the host's store).
  void UsePrivateStores() { private_stores_ = true; }
  bool private_stores() const { return private_stores_; }
  // The host's directory holding worker `index`'s /nix (its store is the
  // "store" directory in it).
  std::string StoreDirOf(size_t index) const;
  // Where `store_path` (/nix/store/…) is on this host: in the store of the
  // first worker that holds it, with private stores; itself otherwise.
  // Also that worker's index in `*worker` (0 without private stores).
  std::string HostPathOf(const std::string& store_path, size_t* worker = nullptr) const;
  // `argv` run as on worker `index`'s machine: in its own store (a mount
  // namespace like the worker's), with the tests' Nix environment. What a
  // user of that machine would do by hand, e.g. a plain `nix build`.
  ProcessSpec OnWorkerMachine(size_t index, const std::vector<std::string>& argv) const;

  // Starts everything and waits (bounded) until each daemon wrote its ready
  // file. Jobs submitted before a worker registers simply queue.
  absl::Status Start();

  const std::string& coordinator_address() const { return coordinator_address_; }
  const std::string& coordinator_metrics() const { return coordinator_metrics_; }
  // The farm store's binary cache (host:port), with --cache-listen; else "".
  const std::string& cache_address() const { return cache_address_; }
  const std::vector<std::string>& worker_metrics() const { return worker_metrics_; }
  std::string LogOf(const std::string& daemon) const { return dir_.Sub(daemon + ".log"); }
  const TempDir& dir() const { return dir_; }

  // Extra coordinator flags (e.g. "--lease=3s"), for this and later starts.
  void SetCoordinatorFlags(std::vector<std::string> flags) { coordinator_flags_ = std::move(flags); }
  // Extra flags for workers started from now on.
  void SetWorkerFlags(std::vector<std::string> flags) { worker_flags_ = std::move(flags); }

  // Starts one more worker and waits for its ready file.
  absl::Status AddWorker();
  // Sends `signal` to worker `index` (0-based) and waits for it to exit.
  // After SIGTERM, an exit other than 0 fails the test.
  void KillWorker(size_t index, int signal);
  // Starts worker `index` again (after KillWorker), same name and work
  // directory, and waits for its ready file.
  absl::Status RestartWorker(size_t index);
  // Sends `signal` to the coordinator and waits for it to exit. After
  // SIGTERM, an exit other than 0 fails the test.
  void KillCoordinator(int signal);
  // Sends `signal` to every daemon at once, waiting for none.
  void SignalAll(int signal);
  // Starts the coordinator again on the same address and state directory.
  absl::Status RestartCoordinator();

  // Runs `kiln --coordinator=… ARGS`.
  absl::StatusOr<CommandResult> Kiln(const std::vector<std::string>& args,
                                     absl::Duration timeout = absl::Minutes(3)) const;
  ProcessSpec KilnSpec(const std::vector<std::string>& args) const;

 private:
  absl::Status StartCoordinator(const std::string& listen);
  // Starts worker `index` (named worker-<index+1>); its ready file's metrics
  // address in `*metrics`.
  absl::StatusOr<std::unique_ptr<Daemon>> StartWorker(size_t index, std::string* metrics);
  // Signals a daemon and waits for it; a SIGTERM that does not end it with
  // exit code 0 is an incident.
  void KillDaemon(const std::string& name, Daemon& daemon, int signal);
  // Notes how a daemon ended, when that is not a clean exit.
  void Note(const std::string& name, const absl::StatusOr<ExitInfo>& ended);
  // Stops every daemon (workers first) and reports incidents.
  void StopAll();

  int workers_;
  int max_jobs_;
  bool private_stores_ = false;
  std::vector<std::string> incidents_;
  std::vector<std::string> coordinator_flags_;
  std::vector<std::string> worker_flags_;
  TempDir dir_;
  std::unique_ptr<Daemon> coordinator_;
  std::vector<std::unique_ptr<Daemon>> worker_daemons_;
  std::string coordinator_address_;
  std::string cache_address_;
  std::string coordinator_metrics_;
  std::vector<std::string> worker_metrics_;
};

// `kiln build ARGS…` running in the background against a farm: the job id
// it announces ("queued as job N") and how it ended. Thread-safe.
class BackgroundBuild {
 public:
  BackgroundBuild(const LocalFarm& farm, const std::vector<std::string>& build_args);
  // Destroying it kills the CLI if it still runs.

  absl::Status spawn_status() const { return spawn_status_; }
  // Waits (bounded) for the job id; empty if none came in time.
  std::string WaitForJobId(absl::Duration timeout);
  // Waits (bounded) for the CLI to exit; then exit() and stdout_data() are set.
  bool WaitDone(absl::Duration timeout);
  const ExitInfo& exit() const { return exit_; }
  const std::string& stdout_data() const { return stdout_; }
  // What it printed on stderr so far (its first MiB).
  std::string stderr_data() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Mutex mu_;
  std::string job_id_ ABSL_GUARDED_BY(mu_);
  std::string stderr_ ABSL_GUARDED_BY(mu_);
  absl::Notification done_;
  ExitInfo exit_;       // Written before done_ is notified.
  std::string stdout_;  // Likewise.
  absl::Status spawn_status_;
  ProcessSupervisor supervisor_;  // Last: its thread stops before the rest goes.
};

// Path of a built binary (KILN_BIN_DIR, set by CTest).
std::string BinPath(const std::string& name);

// GET http://ADDRESS/metrics with curl.
absl::StatusOr<std::string> ScrapeMetrics(const std::string& address);

}  // namespace kiln::testing
