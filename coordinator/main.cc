// kiln-coordinator: parses flags and runs CoordinatorServer until SIGINT/SIGTERM.
#include <algorithm>
#include <cstdio>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/cli_args.h"
#include "common/crash_handler.h"
#include "common/daemon.h"
#include "common/image_ref.h"
#include "common/log.h"
#include "coordinator/coordinator_server.h"
#include "coordinator/token_command.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:7600", "gRPC address (host:port; port 0 picks a free one)");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9600", "Prometheus /metrics address");
ABSL_FLAG(std::string, tls_cert, "", "The coordinator's certificate (PEM), from deploy/pki/kiln-pki coordinator");
ABSL_FLAG(std::string, tls_key, "", "Its private key (PEM)");
ABSL_FLAG(std::string, tls_ca, "", "The farm's CA (PEM): workers must show a certificate that chains to it");
ABSL_FLAG(std::string, name, "", "token create: the token's name (e.g. ci-monorepo)");
ABSL_FLAG(std::vector<std::string>, scope, {},
          "token create: scopes, comma-separated: submit, read, admin, push:REGISTRY/REPOSITORY[:TAG] (globs)");
ABSL_FLAG(bool, json, false, "token create|list: JSON on stdout");
ABSL_FLAG(uint64_t, token_max_active_jobs, 10000,
          "Jobs one client token may have queued or running at once (0: no limit)");
ABSL_FLAG(bool, require_tokens, false,
          "Every client call needs a token, also on loopback without TLS (always so with TLS)");
ABSL_FLAG(std::string, state_dir, "", "Directory for the coordinator's RocksDB state (required)");
ABSL_FLAG(std::string, ready_file, "", "Write the bound addresses here as JSON once serving");
ABSL_FLAG(bool, sync_writes, false, "fsync every state change (survives power loss, slower)");
ABSL_FLAG(uint32_t, max_attempts, 3, "Attempts before a job that keeps losing its worker fails");
ABSL_FLAG(absl::Duration, capability_grace, absl::Seconds(60),
          "After a start, how long workers have to reconnect before a job no known worker could build is refused");
ABSL_FLAG(absl::Duration, lease, absl::Seconds(60),
          "How long a disconnected or silent worker's jobs are held for it before they are requeued");
ABSL_FLAG(int64_t, worker_min_store_free_mb, 1024,
          "A worker with less free space on its Nix store's disk takes no new job (0: no limit)");
ABSL_FLAG(int64_t, worker_min_work_dir_free_mb, 512,
          "A worker with less free space on its work directory's disk (source cache, checkouts) takes no new job "
          "(0: no limit)");
ABSL_FLAG(int64_t, state_min_free_mb, 8,
          "Below this much free space on the state directory's disk the coordinator stops writing and takes no "
          "new work, before the disk is full; it resumes at twice this (0: no reserve)");
ABSL_FLAG(double, worker_max_memory_fraction, 0.95, "A worker using more of its memory takes no new job (0: no limit)");
ABSL_FLAG(double, worker_max_load_per_slot, 0,
          "A worker whose load average per build slot is higher takes no new job (0: no limit)");
ABSL_FLAG(std::vector<std::string>, push_allow, {},
          "Image push targets jobs may name: glob patterns over REGISTRY/REPOSITORY[:TAG], comma-separated "
          "(e.g. rg.fr-par.scw.cloud/sanmarcsoft/*); none by default");
ABSL_FLAG(std::vector<std::string>, priority_names, std::vector<std::string>({"interactive", "ci", "batch"}),
          "Names of the three priority classes, most urgent first (what kiln build --priority takes)");
ABSL_FLAG(absl::Duration, retry_backoff, absl::Seconds(5),
          "Wait before retrying a job after an infrastructure error (doubled per attempt, at most 5 min)");
ABSL_FLAG(absl::Duration, default_timeout, absl::ZeroDuration(), "Timeout of a build that sets none (0: no limit)");
ABSL_FLAG(std::string, log_level, "info", "debug, info, warning or error");
ABSL_FLAG(std::string, log_format, "text", "text, or json: one JSON object per line");
ABSL_FLAG(int64_t, log_retention_kb, 1 << 20,
          "Compressed build logs kept for `kiln log`, in KiB; the oldest finished jobs' logs go first");
ABSL_FLAG(int64_t, cas_max_gb, 100,
          "CAS size above which blobs no queued or running job needs are deleted, oldest first (0: never)");
ABSL_FLAG(absl::Duration, cas_gc_grace, absl::Hours(1), "Blobs stored more recently than this are never collected");
ABSL_FLAG(int64_t, max_tree_mb, 4096, "Largest source tree a submission may name, in MiB (all its files)");
ABSL_FLAG(int64_t, max_blob_mb, 4096, "Largest single blob the CAS accepts, in MiB");
ABSL_FLAG(int64_t, inline_source_kb, 1024,
          "Source trees up to this size (KiB) travel inside each assignment; larger ones send their directories "
          "and workers fetch the files their cache lacks (0: always fetch)");

int main(int argc, char** argv) {
  kiln::InstallCrashHandler(argv[0]);
  absl::SetProgramUsageMessage(
      "Kiln coordinator: accepts Nix builds, schedules them on workers, keeps state in RocksDB.\n"
      "  kiln-coordinator --listen=127.0.0.1:7600 --metrics-listen=127.0.0.1:9600 --state-dir=DIR\n"
      "  kiln-coordinator token create --state-dir=DIR --name=NAME --scope=submit,push:REGISTRY/NS/*:testing\n"
      "  kiln-coordinator token list|revoke NAME --state-dir=DIR\n"
      "  kiln-coordinator backup --state-dir=DIR DESTINATION   (restore: --state-dir=DESTINATION)");
  kiln::DashedFlagArgs dashed(argc, argv);
  std::vector<char*> positional = absl::ParseCommandLine(dashed.argc(), dashed.argv());
  if (positional.size() >= 2 && std::string(positional[1]) == "token") {
    kiln::TokenCommand command;
    command.action = positional.size() >= 3 ? positional[2] : "";
    command.state_dir = absl::GetFlag(FLAGS_state_dir);
    command.name = command.action == "revoke" && positional.size() >= 4 ? positional[3] : absl::GetFlag(FLAGS_name);
    command.scopes = absl::GetFlag(FLAGS_scope);
    command.json = absl::GetFlag(FLAGS_json);
    return kiln::RunTokenCommand(command);
  }
  if (positional.size() >= 2 && std::string(positional[1]) == "backup") {
    if (positional.size() != 3) {
      std::fprintf(stderr, "kiln-coordinator: usage: kiln-coordinator backup --state-dir=DIR DESTINATION\n");
      return 2;
    }
    return kiln::RunBackupCommand(absl::GetFlag(FLAGS_state_dir), positional[2], absl::GetFlag(FLAGS_json));
  }
  if (positional.size() > 1) {
    std::fprintf(stderr, "kiln-coordinator: unexpected argument '%s' (commands: token, backup)\n", positional[1]);
    return 2;
  }
  // Debian's Abseil checks every Mutex acquisition for lock-order cycles
  // (a debug aid: a few % of CPU under load). The tests keep it on.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const sigset_t signals = kiln::BlockTerminationSignals();
  for (absl::Status s :
       {kiln::ApplyLogLevel(absl::GetFlag(FLAGS_log_level)), kiln::ApplyLogFormat(absl::GetFlag(FLAGS_log_format))}) {
    if (!s.ok()) {
      std::fprintf(stderr, "kiln-coordinator: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }

  kiln::CoordinatorOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.state_dir = absl::GetFlag(FLAGS_state_dir);
  options.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_ca)};
  options.require_tokens = absl::GetFlag(FLAGS_require_tokens);
  options.core.max_active_jobs_per_token = absl::GetFlag(FLAGS_token_max_active_jobs);
  options.ready_file = absl::GetFlag(FLAGS_ready_file);
  options.sync_writes = absl::GetFlag(FLAGS_sync_writes);
  options.core.max_attempts = absl::GetFlag(FLAGS_max_attempts);
  options.core.max_tree_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_max_tree_mb)) << 20;
  options.core.cas_max_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_cas_max_gb)) << 30;
  options.core.cas_gc_grace = absl::GetFlag(FLAGS_cas_gc_grace);
  options.core.inline_source_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_inline_source_kb)) << 10;
  options.max_blob_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_max_blob_mb)) << 20;
  options.core.capability_grace = absl::GetFlag(FLAGS_capability_grace);
  options.core.lease = absl::GetFlag(FLAGS_lease);
  options.core.log_retention_bytes = static_cast<uint64_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_log_retention_kb)))
                                     << 10;
  options.core.default_timeout = absl::GetFlag(FLAGS_default_timeout);
  options.core.retry_backoff = absl::GetFlag(FLAGS_retry_backoff);
  options.core.priority_names = absl::GetFlag(FLAGS_priority_names);
  options.core.push_allow = absl::GetFlag(FLAGS_push_allow);
  for (const std::string& pattern : options.core.push_allow) {
    if (absl::StatusOr<kiln::ImagePattern> p = kiln::ParseImagePattern(pattern); !p.ok()) {
      std::fprintf(stderr, "kiln-coordinator: --push-allow: %s\n", std::string(p.status().message()).c_str());
      return 2;
    }
  }
  if (options.core.priority_names.size() != 3) {
    std::fprintf(stderr, "kiln-coordinator: --priority-names wants three names, most urgent first\n");
    return 2;
  }
  options.core.min_store_free_bytes = absl::GetFlag(FLAGS_worker_min_store_free_mb) << 20;
  options.core.min_work_dir_free_bytes = absl::GetFlag(FLAGS_worker_min_work_dir_free_mb) << 20;
  options.core.max_memory_used_fraction = absl::GetFlag(FLAGS_worker_max_memory_fraction);
  if (absl::GetFlag(FLAGS_state_min_free_mb) < 0) {
    std::fprintf(stderr, "kiln-coordinator: --state-min-free-mb must be 0 or more\n");
    return 2;
  }
  options.core.min_free_bytes = static_cast<uint64_t>(absl::GetFlag(FLAGS_state_min_free_mb)) << 20;
  options.core.resume_min_free_bytes = std::max<uint64_t>(uint64_t{16} << 20, 2 * options.core.min_free_bytes);
  options.core.max_load_per_slot = absl::GetFlag(FLAGS_worker_max_load_per_slot);
  auto server = kiln::CoordinatorServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "kiln-coordinator: %s\n", server.status().ToString().c_str());
    return 1;
  }
  const int sig = kiln::AwaitTerminationSignal(signals);
  kiln::LogInfo("coordinator", "signal ", sig, ": shutting down");
  (*server)->Shutdown();
  return 0;
}
