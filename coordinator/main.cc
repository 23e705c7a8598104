// kiln-coordinator: parses flags and runs CoordinatorServer until SIGINT/SIGTERM.
#include <algorithm>
#include <cstdio>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/cli_args.h"
#include "common/command_line.h"
#include "common/crash_handler.h"
#include "common/daemon.h"
#include "common/image_ref.h"
#include "common/log.h"
#include "coordinator/coordinator_server.h"
#include "common/exit_codes.h"
#include "coordinator/binary_cache_server.h"
#include "coordinator/token_command.h"

namespace {

// The command line, parsed by CLI11 (common/command_line.h).
struct Flags {
  std::string listen = "127.0.0.1:7600";
  std::string metrics_listen = "127.0.0.1:9600";
  std::string cache_listen = "";
  double cache_max_gb = 0;
  int cache_pin_buildsets = 10;
  std::string cache_store = "local";
  std::string cache_s3_credentials_file = "";
  absl::Duration cache_gc_interval = absl::Seconds(30);
  std::string tls_cert = "";
  std::string tls_key = "";
  std::string tls_ca = "";
  uint64_t token_max_active_jobs = 10000;
  bool require_tokens = false;
  std::string state_dir = "";
  std::string ready_file = "";
  bool sync_writes = false;
  uint32_t max_attempts = 3;
  absl::Duration capability_grace = absl::Seconds(60);
  absl::Duration lease = absl::Seconds(60);
  int64_t worker_min_store_free_mb = 1024;
  int64_t worker_min_work_dir_free_mb = 512;
  int64_t state_min_free_mb = 8;
  double worker_max_memory_fraction = 0.95;
  double worker_max_load_per_slot = 0;
  std::vector<std::string> push_allow = {};
  std::vector<std::string> priority_names = {"interactive", "ci", "batch"};
  absl::Duration retry_backoff = absl::Seconds(5);
  absl::Duration default_timeout = absl::ZeroDuration();
  std::string log_level = "info";
  std::string log_format = "text";
  int64_t log_retention_kb = 1 << 20;
  int64_t cas_max_gb = 100;
  absl::Duration cas_gc_grace = absl::Hours(1);
  int64_t max_tree_mb = 4096;
  int64_t max_blob_mb = 4096;
  int64_t inline_source_kb = 1024;
};

void AddOptions(CLI::App& app, Flags& flags) {
  app.add_option("--listen", flags.listen, "gRPC address (host:port; port 0 picks a free one)")->capture_default_str();
  app.add_option("--metrics-listen", flags.metrics_listen, "Prometheus /metrics address")->capture_default_str();
  app.add_option("--cache-listen", flags.cache_listen,
                 "Serve the farm store as a Nix binary cache here (loopback host:port); empty: not served")
      ->capture_default_str();
  app.add_option("--cache-store", flags.cache_store,
                 "Where the farm store keeps NARs: local (the state directory) or "
                 "s3://BUCKET?endpoint=HOST[:PORT]&region=REGION[&scheme=http] (a bucket laid out as a binary cache)")
      ->capture_default_str();
  app.add_option("--cache-s3-credentials-file", flags.cache_s3_credentials_file,
                 "The bucket's credentials: a file with aws_access_key_id = … and aws_secret_access_key = … lines");
  app.add_option("--cache-max-gb", flags.cache_max_gb,
                 "The farm store's size limit in GiB of compressed NARs: least recently used paths are collected "
                 "beyond it (never one a kept path needs); 0: unbounded")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--cache-pin-buildsets", flags.cache_pin_buildsets,
                 "The outputs of this many most recent buildsets, with their closures, are never collected")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  kiln::AddDurationOption(app, "--cache-gc-interval", &flags.cache_gc_interval,
                          "How often the farm store's size is checked against --cache-max-gb");
  app.add_option("--tls-cert", flags.tls_cert,
                 "The coordinator's certificate (PEM), from deploy/pki/kiln-pki coordinator")
      ->capture_default_str();
  app.add_option("--tls-key", flags.tls_key, "Its private key (PEM)")->capture_default_str();
  app.add_option("--tls-ca", flags.tls_ca, "The farm's CA (PEM): workers must show a certificate that chains to it")
      ->capture_default_str();
  app.add_option("--token-max-active-jobs", flags.token_max_active_jobs,
                 "Jobs one client token may have queued or running at once (0: no limit)")
      ->capture_default_str();
  app.add_flag("--require-tokens", flags.require_tokens,
               "Every client call needs a token, also on loopback without TLS (always so with TLS)");
  app.add_option("--state-dir", flags.state_dir, "Directory for the coordinator's RocksDB state (required)")
      ->capture_default_str();
  app.add_option("--ready-file", flags.ready_file, "Write the bound addresses here as JSON once serving")
      ->capture_default_str();
  app.add_flag("--sync-writes", flags.sync_writes, "fsync every state change (survives power loss, slower)");
  app.add_option("--max-attempts", flags.max_attempts, "Attempts before a job that keeps losing its worker fails")
      ->capture_default_str();
  kiln::AddDurationOption(
      app, "--capability-grace", &flags.capability_grace,
      "After a start, how long workers have to reconnect before a job no known worker could build is refused");
  kiln::AddDurationOption(app, "--lease", &flags.lease,
                          "How long a disconnected or silent worker's jobs are held for it before they are requeued");
  app.add_option("--worker-min-store-free-mb", flags.worker_min_store_free_mb,
                 "A worker with less free space on its Nix store's disk takes no new job (0: no limit)")
      ->capture_default_str();
  app.add_option(
         "--worker-min-work-dir-free-mb", flags.worker_min_work_dir_free_mb,
         "A worker with less free space on its work directory's disk (source cache, checkouts) takes no new job "
         "(0: no limit)")
      ->capture_default_str();
  app.add_option("--state-min-free-mb", flags.state_min_free_mb,
                 "Below this much free space on the state directory's disk the coordinator stops writing and takes no "
                 "new work, before the disk is full; it resumes at twice this (0: no reserve)")
      ->capture_default_str();
  app.add_option("--worker-max-memory-fraction", flags.worker_max_memory_fraction,
                 "A worker using more of its memory takes no new job (0: no limit)")
      ->capture_default_str();
  app.add_option("--worker-max-load-per-slot", flags.worker_max_load_per_slot,
                 "A worker whose load average per build slot is higher takes no new job (0: no limit)")
      ->capture_default_str();
  kiln::AddListOption(app, "--push-allow", &flags.push_allow,
                      "Image push targets jobs may name: glob patterns over REGISTRY/REPOSITORY[:TAG], comma-separated "
                      "(e.g. rg.fr-par.scw.cloud/sanmarcsoft/*); none by default");
  kiln::AddListOption(app, "--priority-names", &flags.priority_names,
                      "Names of the three priority classes, most urgent first (what kiln build --priority takes)");
  kiln::AddDurationOption(
      app, "--retry-backoff", &flags.retry_backoff,
      "Wait before retrying a job after an infrastructure error (doubled per attempt, at most 5 min)");
  kiln::AddDurationOption(app, "--default-timeout", &flags.default_timeout,
                          "Timeout of a build that sets none (0: no limit)");
  app.add_option("--log-level", flags.log_level, "debug, info, warning or error")->capture_default_str();
  app.add_option("--log-format", flags.log_format, "text, or json: one JSON object per line")->capture_default_str();
  app.add_option("--log-retention-kb", flags.log_retention_kb,
                 "Compressed build logs kept for `kiln log`, in KiB; the oldest finished jobs' logs go first")
      ->capture_default_str();
  app.add_option("--cas-max-gb", flags.cas_max_gb,
                 "CAS size above which blobs no queued or running job needs are deleted, oldest first (0: never)")
      ->capture_default_str();
  kiln::AddDurationOption(app, "--cas-gc-grace", &flags.cas_gc_grace,
                          "Blobs stored more recently than this are never collected");
  app.add_option("--max-tree-mb", flags.max_tree_mb,
                 "Largest source tree a submission may name, in MiB (all its files)")
      ->capture_default_str();
  app.add_option("--max-blob-mb", flags.max_blob_mb, "Largest single blob the CAS accepts, in MiB")
      ->capture_default_str();
  app.add_option("--inline-source-kb", flags.inline_source_kb,
                 "Source trees up to this size (KiB) travel inside each assignment; larger ones send their directories "
                 "and workers fetch the files their cache lacks (0: always fetch)")
      ->capture_default_str();
}

}  // namespace

int main(int argc, char** argv) {
  kiln::InstallCrashHandler(argv[0]);
  CLI::App app(
      "Kiln coordinator: accepts Nix builds, schedules them on workers, keeps state in RocksDB.\n"
      "  kiln-coordinator --listen=127.0.0.1:7600 --metrics-listen=127.0.0.1:9600 --state-dir=DIR\n"
      "  kiln-coordinator token create --state-dir=DIR --name=NAME --scope=submit,push:REGISTRY/NS/*:testing\n"
      "  kiln-coordinator token list|revoke NAME --state-dir=DIR\n"
      "  kiln-coordinator backup --state-dir=DIR DESTINATION   (restore: --state-dir=DESTINATION)",
      "kiln-coordinator");
  kiln::UseKilnConventions(app);
  Flags flags;
  AddOptions(app, flags);
  kiln::AddConfigFileOption(app);
  // The commands: the daemon's --state-dir (and --config) reach them.
  kiln::TokenCommand token;
  std::string destination;
  CLI::App* token_app = app.add_subcommand("token", "Client tokens: create, list, revoke")->require_subcommand(1);
  token_app->fallthrough();
  CLI::App* create = token_app->add_subcommand("create", "A new token; its secret is printed once");
  create->fallthrough();
  create->add_option("--name", token.name, "The token's name (e.g. ci-monorepo)")->required();
  kiln::AddListOption(*create, "--scope", &token.scopes,
                      "Scopes, comma-separated: submit, read, admin, worker, push:REGISTRY/REPOSITORY[:TAG] (globs)")
      ->required();
  create->add_flag("--json", token.json, "JSON on stdout");
  CLI::App* list = token_app->add_subcommand("list", "Every token, without secrets");
  list->fallthrough();
  list->add_flag("--json", token.json, "JSON on stdout");
  CLI::App* revoke = token_app->add_subcommand("revoke", "Delete a token: it stops working at once");
  revoke->fallthrough();
  revoke->add_option("NAME", token.name, "The token's name")->required();
  bool backup_json = false;
  CLI::App* backup = app.add_subcommand("backup", "A consistent copy of the state, while serving");
  backup->fallthrough();
  backup->add_option("DESTINATION", destination, "A directory that does not exist yet")->required();
  backup->add_flag("--json", backup_json, "JSON on stdout");
  CLI::App* cache_app =
      app.add_subcommand("cache", "The farm store's signing key: key create, public-key")->require_subcommand(1);
  cache_app->fallthrough();
  std::string key_name = "kiln-farm-1";
  CLI::App* key_app = cache_app->add_subcommand("key", "The signing key")->require_subcommand(1);
  key_app->fallthrough();
  CLI::App* key_create = key_app->add_subcommand("create", "A new signing key, replacing the old one");
  key_create->fallthrough();
  key_create->add_option("--name", key_name, "The key's name, as Nix shows it (e.g. kiln-farm-2)")
      ->capture_default_str();
  CLI::App* public_key = cache_app->add_subcommand("public-key", "Print the trusted-public-keys entry");
  public_key->fallthrough();
  if (std::optional<int> exit = kiln::ParseCommandLine(app, argc, argv)) return *exit;
  if (cache_app->parsed()) {
    if (flags.state_dir.empty()) {
      std::fprintf(stderr, "kiln-coordinator: --state-dir is required\n");
      return kiln::kExitUsage;
    }
    // Printed: only the public half, ever.
    absl::StatusOr<kiln::SigningKey> key = key_create->parsed() ? kiln::CreateCacheKey(flags.state_dir, key_name)
                                                                : kiln::LoadOrCreateCacheKey(flags.state_dir, key_name);
    if (!key.ok()) {
      std::fprintf(stderr, "kiln-coordinator: %s\n", std::string(key.status().message()).c_str());
      return kiln::kExitBuildFailed;
    }
    std::printf("%s\n", key->PublicKeyText().c_str());
    return kiln::kExitOk;
  }
  if (token_app->parsed()) {
    token.action = create->parsed() ? "create" : list->parsed() ? "list" : "revoke";
    token.state_dir = flags.state_dir;
    return kiln::RunTokenCommand(token);
  }
  if (backup->parsed()) return kiln::RunBackupCommand(flags.state_dir, destination, backup_json);
  // Debian's Abseil checks every Mutex acquisition for lock-order cycles
  // (a debug aid: a few % of CPU under load). The tests keep it on.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const sigset_t signals = kiln::BlockTerminationSignals();
  for (absl::Status s : {kiln::ApplyLogLevel(flags.log_level), kiln::ApplyLogFormat(flags.log_format)}) {
    if (!s.ok()) {
      std::fprintf(stderr, "kiln-coordinator: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }

  kiln::CoordinatorOptions options;
  options.listen = flags.listen;
  options.metrics_listen = flags.metrics_listen;
  options.cache_listen = flags.cache_listen;
  options.cache_max_bytes = static_cast<uint64_t>(flags.cache_max_gb * static_cast<double>(uint64_t{1} << 30));
  options.cache_pin_buildsets = flags.cache_pin_buildsets;
  options.cache_store = flags.cache_store;
  options.cache_s3_credentials_file = flags.cache_s3_credentials_file;
  if (flags.cache_gc_interval <= absl::ZeroDuration()) {
    std::fprintf(stderr, "kiln-coordinator: --cache-gc-interval must be positive\n");
    return 2;
  }
  options.cache_gc_interval = flags.cache_gc_interval;
  options.state_dir = flags.state_dir;
  options.tls = {flags.tls_cert, flags.tls_key, flags.tls_ca};
  options.require_tokens = flags.require_tokens;
  options.core.max_active_jobs_per_token = flags.token_max_active_jobs;
  options.ready_file = flags.ready_file;
  options.sync_writes = flags.sync_writes;
  options.core.max_attempts = flags.max_attempts;
  options.core.max_tree_bytes = static_cast<uint64_t>(flags.max_tree_mb) << 20;
  options.core.cas_max_bytes = static_cast<uint64_t>(flags.cas_max_gb) << 30;
  options.core.cas_gc_grace = flags.cas_gc_grace;
  options.core.inline_source_bytes = static_cast<uint64_t>(flags.inline_source_kb) << 10;
  options.max_blob_bytes = static_cast<uint64_t>(flags.max_blob_mb) << 20;
  options.core.capability_grace = flags.capability_grace;
  options.core.lease = flags.lease;
  options.core.log_retention_bytes = static_cast<uint64_t>(std::max<int64_t>(0, flags.log_retention_kb)) << 10;
  options.core.default_timeout = flags.default_timeout;
  options.core.retry_backoff = flags.retry_backoff;
  options.core.priority_names = flags.priority_names;
  options.core.push_allow = flags.push_allow;
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
  options.core.min_store_free_bytes = flags.worker_min_store_free_mb << 20;
  options.core.min_work_dir_free_bytes = flags.worker_min_work_dir_free_mb << 20;
  options.core.max_memory_used_fraction = flags.worker_max_memory_fraction;
  if (flags.state_min_free_mb < 0) {
    std::fprintf(stderr, "kiln-coordinator: --state-min-free-mb must be 0 or more\n");
    return 2;
  }
  options.core.min_free_bytes = static_cast<uint64_t>(flags.state_min_free_mb) << 20;
  options.core.resume_min_free_bytes = std::max<uint64_t>(uint64_t{16} << 20, 2 * options.core.min_free_bytes);
  options.core.max_load_per_slot = flags.worker_max_load_per_slot;
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
