// LocalFarm: a real coordinator and N real workers, started as processes from
// the built binaries, on 127.0.0.1 with ports picked by the kernel (port 0,
// read back from --ready-file). Nix runs offline (no substituters).
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/subprocess.h"
#include "tests/support/test_util.h"

namespace kiln::testing {

// A daemon process with its output in a log file; killed on destruction.
class Daemon {
 public:
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const std::vector<std::string>& argv,
                                                       const std::string& log_path,
                                                       const std::vector<std::string>& extra_env);
  ~Daemon();
  void Kill(int signal);
  // Waits (bounded) for the process to exit; true if it did.
  bool WaitExit(int timeout_ms);
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
};

// Polls (at most 30 s) for a daemon's --ready-file, which appears once it
// serves; its JSON, or an error quoting the daemon's log.
absl::StatusOr<nlohmann::json> WaitForReadyFile(const std::string& path, const std::string& log);

// Environment for Nix in tests: offline, flakes on.
std::vector<std::string> NixTestEnv();

class LocalFarm {
 public:
  explicit LocalFarm(int workers, int max_jobs_per_worker = 2);
  ~LocalFarm();

  // Starts everything and waits (bounded) until each daemon wrote its ready
  // file. Jobs submitted before a worker registers simply queue.
  absl::Status Start();

  const std::string& coordinator_address() const { return coordinator_address_; }
  const std::string& coordinator_metrics() const { return coordinator_metrics_; }
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
  void KillWorker(size_t index, int signal);
  // Starts worker `index` again (after KillWorker), same name and work
  // directory, and waits for its ready file.
  absl::Status RestartWorker(size_t index);
  // Sends `signal` to the coordinator and waits for it to exit.
  void KillCoordinator(int signal);
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

  int workers_;
  int max_jobs_;
  std::vector<std::string> coordinator_flags_;
  std::vector<std::string> worker_flags_;
  TempDir dir_;
  std::unique_ptr<Daemon> coordinator_;
  std::vector<std::unique_ptr<Daemon>> worker_daemons_;
  std::string coordinator_address_;
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

 private:
  absl::Mutex mu_;
  std::string job_id_ ABSL_GUARDED_BY(mu_);
  absl::Notification done_;
  ExitInfo exit_;        // Written before done_ is notified.
  std::string stdout_;   // Likewise.
  absl::Status spawn_status_;
  ProcessSupervisor supervisor_;  // Last: its thread stops before the rest goes.
};

// Path of a built binary (KILN_BIN_DIR, set by CTest).
std::string BinPath(const std::string& name);

// GET http://ADDRESS/metrics with curl.
absl::StatusOr<std::string> ScrapeMetrics(const std::string& address);

}  // namespace kiln::testing
