// kiln-worker: parses flags, detects what the local Nix builds, and runs a
// WorkerAgent until SIGINT/SIGTERM.
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "common/cli_args.h"
#include "common/command_line.h"
#include "common/crash_handler.h"
#include "common/daemon.h"
#include "common/grpc_util.h"
#include "common/log.h"
#include "common/metrics_http.h"
#include "common/net.h"
#include "common/subprocess.h"
#include "common/tls.h"
#include "worker/direct_upload_client.h"
#include "worker/farm_cache_relay.h"
#include "common/nix_store_validity.h"
#include "worker/served_derivation_executor.h"
#include "common/farm_store_client.h"
#include "worker/farm_uploading_executor.h"
#include "worker/fod_checking_executor.h"
#include "worker/fod_oracle.h"
#include "push/layer_gzip.h"
#include "worker/image_publisher.h"
#include "worker/local_store.h"
#include "worker/nix_build_executor.h"
#include "worker/publishing_executor.h"
#include "worker/nix_system_info.h"
#include "worker/source_cache.h"
#include "worker/worker_agent.h"

namespace {

// The command line, parsed by CLI11 (common/command_line.h).
struct Flags {
  std::string coordinator = "127.0.0.1:7600";
  std::string name = "";
  std::string tls_cert = "";
  std::string token_file = "";
  std::string tls_key = "";
  std::string tls_ca = "";
  std::string work_dir = "";
  int max_jobs = 1;
  int cores = 0;
  std::string metrics_listen = "127.0.0.1:9601";
  std::vector<std::string> systems = {};
  std::vector<std::string> features = {};
  std::vector<std::string> mandatory_features = {};
  std::string registry_auth_file = "";
  std::vector<std::string> insecure_registries = {};
  std::string registry_ca = "";
  std::string push_gzip_level = absl::StrCat(kiln::kDefaultGzipLevel);
  std::vector<std::string> labels = {};
  std::vector<std::string> nix_option = {};
  std::string nix = "nix";
  std::string ready_file = "";
  std::string log_level = "info";
  std::string log_format = "text";
  int64_t blob_cache_mb = 10240;
  bool farm_store = true;
};

void AddOptions(CLI::App& app, Flags& flags) {
  app.add_option("--coordinator", flags.coordinator, "Coordinator gRPC address")->capture_default_str();
  app.add_option("--name", flags.name,
                 "Worker name (default: the host name; with --tls-cert, the coordinator knows it by the certificate's)")
      ->capture_default_str();
  app.add_option("--tls-cert", flags.tls_cert, "This worker's certificate (PEM), from deploy/pki/kiln-pki worker")
      ->capture_default_str();
  app.add_option(
         "--token-file", flags.token_file,
         "A file holding a client token of scope 'worker' (kiln-coordinator token create --scope=worker), for a "
         "coordinator that requires tokens without TLS")
      ->capture_default_str();
  app.add_option("--tls-key", flags.tls_key, "Its private key (PEM)")->capture_default_str();
  app.add_option("--tls-ca", flags.tls_ca, "The farm's CA (PEM): the coordinator's certificate must chain to it")
      ->capture_default_str();
  app.add_option("--work-dir", flags.work_dir, "Directory for unpacked sources (required)")->capture_default_str();
  app.add_option("--max-jobs", flags.max_jobs,
                 "Slots: builds run at once, and derivations built at once by all of them together (a build alone "
                 "may use every slot)")
      ->capture_default_str();
  app.add_option("--cores", flags.cores,
                 "Cores each derivation is given (Nix's --cores, NIX_BUILD_CORES); 0: the CPUs divided by --max-jobs")
      ->capture_default_str();
  app.add_option("--metrics-listen", flags.metrics_listen, "Prometheus /metrics address (port 0: any free)")
      ->capture_default_str();
  kiln::AddListOption(app, "--systems", &flags.systems, "Systems built (default: what the local Nix reports)");
  kiln::AddListOption(app, "--features", &flags.features,
                      "Supported features (default: the local Nix's system-features)");
  kiln::AddListOption(app, "--mandatory-features", &flags.mandatory_features,
                      "Features a job must ask for to run here");
  app.add_option("--registry-auth-file", flags.registry_auth_file,
                 "Registry credentials for image pushes: a docker-style config.json (auths); none: anonymous pushes")
      ->capture_default_str();
  kiln::AddListOption(app, "--insecure-registries", &flags.insecure_registries,
                      "Registries (host:port) spoken to over plain HTTP, for local tests only");
  app.add_option("--registry-ca", flags.registry_ca, "CA bundle for registries (default: the system's)")
      ->capture_default_str();
  app.add_option(
         "--push-gzip-level", flags.push_gzip_level,
         "gzip level of pushed layers: 1 fastest … 9 smallest (the default makes layers no larger than skopeo's), "
         "or fast: ISA-L's igzip, 4-5x faster for layers 2-11% larger (a registry on a fast link)")
      ->capture_default_str();
  kiln::AddListOption(app, "--labels", &flags.labels, "Labels as key=value, e.g. pool=orbstack,region=fr-par");
  kiln::AddListOption(app, "--nix-option", &flags.nix_option,
                      "Nix settings for every build as name=value (e.g. substituters= for offline builds)");
  app.add_option("--nix", flags.nix, "The nix binary")->capture_default_str();
  app.add_option("--ready-file", flags.ready_file, "Write the bound metrics address here as JSON once started")
      ->capture_default_str();
  app.add_option("--log-level", flags.log_level, "debug, info, warning or error")->capture_default_str();
  app.add_option("--log-format", flags.log_format, "text, or json: one JSON object per line")->capture_default_str();
  app.add_option("--blob-cache-mb", flags.blob_cache_mb,
                 "Source blobs kept in WORK_DIR/cas between builds, in MiB; least recently used go first (0: none)")
      ->capture_default_str();
  app.add_option("--farm-store", flags.farm_store,
                 "Send what builds produce to the coordinator's farm store and substitute from it (false: neither)")
      ->capture_default_str();
}

}  // namespace

namespace {

std::vector<std::pair<std::string, std::string>> SplitPairs(const std::vector<std::string>& items) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& item : items) {
    std::pair<std::string, std::string> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    out.push_back(std::move(kv));
  }
  return out;
}

// The CPUs this process may run on (what `nproc` says), which a cgroup or
// `taskset` may make fewer than the machine has.
int UsableCpus() {
  cpu_set_t set;
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "kiln-worker: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  kiln::InstallCrashHandler(argv[0]);
  CLI::App app(
      "Kiln worker: runs Nix builds for a coordinator.\n"
      "  kiln-worker --coordinator=127.0.0.1:7600 --name=NAME --work-dir=DIR --max-jobs=N --metrics-listen=ADDR",
      "kiln-worker");
  kiln::UseKilnConventions(app);
  Flags flags;
  AddOptions(app, flags);
  kiln::AddConfigFileOption(app);
  if (std::optional<int> exit = kiln::ParseCommandLine(app, argc, argv)) return *exit;
  // Debian's Abseil checks every Mutex acquisition for lock-order cycles
  // (a debug aid: a few % of CPU under load). The tests keep it on.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  const sigset_t signals = kiln::BlockTerminationSignals();
  if (absl::Status s = kiln::ApplyLogLevel(flags.log_level); !s.ok()) return Fail(std::string(s.message()));
  if (absl::Status s = kiln::ApplyLogFormat(flags.log_format); !s.ok()) {
    return Fail(std::string(s.message()));
  }

  kiln::WorkerOptions options;
  options.coordinator = flags.coordinator;
  options.name = flags.name;
  if (options.name.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof host - 1);
    options.name = host;
  }
  if (absl::Status s = kiln::CheckPrintableName("--name", options.name, 128); !s.ok()) {
    return Fail(std::string(s.message()));
  }
  options.work_dir = flags.work_dir;
  if (options.work_dir.empty()) return Fail("--work-dir is required");
  std::error_code ec;
  std::filesystem::create_directories(options.work_dir, ec);
  if (ec) return Fail("cannot create --work-dir: " + ec.message());
  options.work_dir = std::filesystem::absolute(options.work_dir).string();
  // Builds a previous run of this worker left behind when it died without
  // stopping them (SIGKILL, the OOM killer) hold Nix's locks on their
  // outputs, and one waiting for its derivation on a named pipe would wait
  // forever: stop them before anything else.
  const std::string process_ledger_dir = options.work_dir + "/processes";
  // And any Nix a crash caught between starting it and listing it: it works
  // in a build's directory.
  if (const int stopped =
          kiln::ProcessSupervisor::StopLeftovers(process_ledger_dir, absl::Seconds(10)) +
          kiln::ProcessSupervisor::StopProcessesIn(options.work_dir + "/builds", flags.nix, absl::Seconds(10));
      stopped > 0) {
    kiln::LogWarning("worker", "stopped ", stopped, " Nix process(es) left running by a previous run of this worker");
  }
  kiln::SweepSourceCacheLeftovers(options.work_dir);
  options.max_jobs = flags.max_jobs;
  if (options.max_jobs < 1) return Fail("--max-jobs must be at least 1");
  const absl::StatusOr<int> gzip_level = kiln::ParseGzipLevel(flags.push_gzip_level);
  if (!gzip_level.ok()) return Fail("--push-gzip-level: " + std::string(gzip_level.status().message()));
  options.systems = flags.systems;
  options.supported_features = flags.features;
  options.mandatory_features = flags.mandatory_features;
  absl::StatusOr<std::map<std::string, std::string>> labels = kiln::ParseLabels(flags.labels);
  if (!labels.ok()) return Fail(absl::StrCat("--labels: ", labels.status().message()));
  options.labels = *std::move(labels);
  options.blob_cache_bytes = static_cast<uint64_t>(std::max<int64_t>(0, flags.blob_cache_mb)) << 20;
  if (options.systems.empty() || options.supported_features.empty()) {
    auto info = kiln::QueryNixSystemInfo(flags.nix);
    if (!info.ok()) return Fail(std::string(info.status().message()));
    if (options.systems.empty()) options.systems = info->systems;
    if (options.supported_features.empty()) options.supported_features = info->features;
  }

  // Mutual TLS with the coordinator, or plaintext on loopback only.
  const kiln::TlsFiles tls{flags.tls_cert, flags.tls_key, flags.tls_ca};
  if (tls.enabled() && (tls.cert.empty() || tls.key.empty())) {
    return Fail(
        "--tls-cert and --tls-key are needed with --tls-ca: the coordinator accepts only workers that show a "
        "certificate of the farm");
  }
  if (!tls.enabled()) {
    if (auto s = kiln::CheckPlaintextAllowed("kiln-worker", {options.coordinator}); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }
  if (tls.enabled()) {
    // The coordinator knows this worker by its certificate's name.
    absl::StatusOr<std::string> cert_name = kiln::CertificateCommonName(tls.cert);
    if (!cert_name.ok()) return Fail(std::string(cert_name.status().message()));
    if (!flags.name.empty() && flags.name != *cert_name) {
      return Fail("--name=" + flags.name + " but the certificate is for '" + *cert_name +
                  "': a worker is known by its certificate's name");
    }
    options.name = *cert_name;
  }
  auto credentials = kiln::MakeChannelCredentials(tls);
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  options.credentials = *credentials;
  if (const std::string path = flags.token_file; !path.empty()) {
    // A file, never the command line: argv is visible to every user.
    absl::StatusOr<std::string> token = kiln::ReadPrivateTokenFile(path);
    if (!token.ok()) return Fail(absl::StrCat("--token-file: ", token.status().message()));
    if (token->empty()) return Fail("--token-file: " + path + " holds no token");
    options.token = *std::move(token);
  }

  kiln::NixOptions nix;
  nix.nix_binary = flags.nix;
  nix.options = SplitPairs(flags.nix_option);
  nix.max_jobs = options.max_jobs;
  if (flags.cores < 0) return Fail("--cores must be 0 (the default share) or more");
  nix.cores = flags.cores > 0 ? flags.cores : kiln::DefaultCoresPerDerivation(UsableCpus(), options.max_jobs);

  auto registry = std::make_shared<prometheus::Registry>();
  kiln::WorkerMetrics metrics(registry);
  // /readyz: registered with the coordinator (the gauge the agent keeps).
  auto readiness = [&metrics]() -> absl::Status {
    if (metrics.coordinator_connected.Value() < 1) return absl::UnavailableError("not connected to the coordinator");
    return absl::OkStatus();
  };
  auto metrics_server = kiln::MetricsHttpServer::Start(flags.metrics_listen, {registry}, readiness);
  if (!metrics_server.ok()) return Fail(std::string(metrics_server.status().message()));
  if (!flags.ready_file.empty()) {
    nlohmann::json ready = {{"metrics", (*metrics_server)->address()}, {"name", options.name}};
    if (auto s = kiln::WriteFileAtomically(flags.ready_file, ready.dump() + "\n"); !s.ok()) {
      return Fail(std::string(s.message()));
    }
  }

  // Every build's fixed-output derivations are checked against the fleet's
  // FOD cache, and what builds find is recorded there.
  const std::shared_ptr<grpc::Channel> channel =
      kiln::MakeChannel(options.coordinator, options.credentials, options.token);
  kiln::GrpcFodOracle fod_oracle(channel, options.name);
  // The farm store: builds substitute from it through a relay on 127.0.0.1
  // (worker/farm_cache_relay.h) and send it what they build.
  kiln::GrpcFarmStoreClient farm_store_rpc(channel);
  // Where the farm keeps NARs in object storage, the worker puts them there
  // itself (presigned URLs), staged in WORK_DIR/farm-upload.
  kiln::DirectUploadClient farm_store(&farm_store_rpc, options.work_dir + "/farm-upload");
  std::unique_ptr<kiln::FarmCacheRelay> relay;
  if (flags.farm_store) {
    absl::StatusOr<std::unique_ptr<kiln::FarmCacheRelay>> started = kiln::FarmCacheRelay::Start(&farm_store, &metrics);
    if (!started.ok()) return Fail(std::string(started.status().message()));
    relay = *std::move(started);
    nix.adjust_options = [r = relay.get()](const kiln::NixOptionList& o) { return r->NixOptionsFor(o); };
  }
  if (relay != nullptr) relay->PrimeNixCache(kiln::NixStoreBinaryBeside(nix.nix_binary), nix.options);
  kiln::NixLocalStore local_store(nix.nix_binary, nix.options);
  nix.scratch_dir = options.work_dir;
  nix.process_ledger_dir = process_ledger_dir;
  kiln::RegistryPublisherOptions push_options;
  push_options.auth_file = flags.registry_auth_file;
  for (const std::string& r : flags.insecure_registries) push_options.insecure_registries.insert(r);
  push_options.ca_file = flags.registry_ca;
  push_options.scratch_dir = options.work_dir;
  push_options.layer_cache_file = options.work_dir + "/layer-cache.json";
  push_options.gzip_level = *gzip_level;
  push_options.parallel = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  kiln::RegistryPublisher publisher(push_options, &metrics);

  // The executor stack, innermost first: Nix, FOD checks, the farm store
  // upload, image publishing.
  // It outlives the agent: the agent's Stop() waits for the builds it
  // cancels to report back through it.
  kiln::NixBuildExecutor nix_executor(nix);
  kiln::FodCheckingExecutor fod_checking(&nix_executor, &fod_oracle, &local_store);
  // Derivation jobs (a Nix client's, through `kiln serve-nix`) are built
  // here, by the worker's own nix-store --serve, not by the FOD layer.
  kiln::ServedDerivationExecutor served(
      &fod_checking,
      [&nix] {
        kiln::ServedDerivationNix n;
        const size_t slash = nix.nix_binary.rfind('/');
        n.nix_store = slash == std::string::npos ? "nix-store" : nix.nix_binary.substr(0, slash + 1) + "nix-store";
        n.options = nix.adjust_options ? nix.adjust_options(nix.options) : nix.options;
        return n;
      },
      &fod_oracle);
  kiln::FarmUploadingExecutor uploading(&served, &local_store, &farm_store, kiln::FarmUploadOptions{}, &metrics);
  kiln::PublishingExecutor executor(flags.farm_store ? static_cast<kiln::BuildExecutor*>(&uploading) : &served,
                                    &publisher);
  kiln::WorkerAgent agent(options, &executor, &metrics);
  kiln::LogInfo("worker", options.name, ": ", options.max_jobs, " slot(s), ", nix.cores,
                " core(s) per derivation, metrics on http://", (*metrics_server)->address(), "/metrics, coordinator ",
                options.coordinator);
  agent.Start();
  const int sig = kiln::AwaitTerminationSignal(signals);
  kiln::LogInfo("worker", "signal ", sig, ": shutting down");
  agent.Stop();
  return 0;
}
