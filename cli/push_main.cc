// kiln-push (run as `kiln push RESULT REF`): pushes a local docker-archive
// with the workers' pusher. A binary of its own so that `kiln build`, which
// runs on every build, does not load libcurl and libarchive.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "common/cli_args.h"
#include "common/crash_handler.h"
#include "common/image_ref.h"
#include "push/credentials.h"
#include "push/image_pusher.h"
#include "push/layer_gzip.h"
#include "push/registry_client.h"

ABSL_FLAG(std::vector<std::string>, tag, {}, "More tags (comma-separated)");
ABSL_FLAG(std::string, authfile, "",
          "docker-style config.json with the registry's credentials (default: $REGISTRY_AUTH_FILE, "
          "then ~/.docker/config.json); or set KILN_REGISTRY_USER and KILN_REGISTRY_PASSWORD");
ABSL_FLAG(bool, insecure, false, "Speak plain HTTP to the registry (local tests only)");
ABSL_FLAG(std::string, registry_ca, "", "CA bundle for the registry (default: the system's)");
ABSL_FLAG(std::string, gzip_level, absl::StrCat(kiln::kDefaultGzipLevel),
          "gzip level of the layers: 1 fastest … 9 smallest (the default makes layers no larger than skopeo's), "
          "or fast: ISA-L's igzip, 4-5x faster for layers 2-11% larger (a registry on a fast link)");
ABSL_FLAG(bool, json, false, "Print the result as JSON");
ABSL_FLAG(bool, oci, false, "Push an OCI manifest (default: Docker v2 schema 2, as skopeo does)");
ABSL_FLAG(int, parallel, 0, "Threads compressing layers, and layers sent at once (0: one per CPU core)");

namespace {

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  return code;
}

std::string DefaultAuthFile() {
  if (const char* f = std::getenv("REGISTRY_AUTH_FILE"); f != nullptr && *f) return f;
  if (const char* home = std::getenv("HOME"); home != nullptr && *home) {
    const std::string path = absl::StrCat(home, "/.docker/config.json");
    if (::access(path.c_str(), R_OK) == 0) return path;
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  kiln::InstallCrashHandler(argv[0]);
  absl::SetProgramUsageMessage("kiln push RESULT REGISTRY/REPOSITORY[:TAG] [--tag=T,...] [--authfile=F] [--json]");
  kiln::DashedFlagArgs dashed(argc, argv);  // --gzip-level as well as --gzip_level
  std::vector<char*> args = absl::ParseCommandLine(dashed.argc(), dashed.argv());
  if (args.size() != 3) return Fail("usage: kiln push RESULT REGISTRY/REPOSITORY[:TAG] [--tag=T,...]", 2);
  const std::string archive = args[1];
  std::vector<std::string> tags;
  absl::StatusOr<kiln::ImageRef> ref = kiln::ParsePushReference(args[2], absl::GetFlag(FLAGS_tag), &tags);
  if (!ref.ok()) return Fail(std::string(ref.status().message()), 2);

  kiln::RegistryOptions options;
  options.plain_http = absl::GetFlag(FLAGS_insecure);
  options.ca_file = absl::GetFlag(FLAGS_registry_ca);
  const char* user = std::getenv("KILN_REGISTRY_USER");
  const char* password = std::getenv("KILN_REGISTRY_PASSWORD");
  if (password != nullptr && *password) {
    options.credentials = {user != nullptr && *user ? user : "nologin", password};
  } else {
    const std::string auth_file =
        absl::GetFlag(FLAGS_authfile).empty() ? DefaultAuthFile() : absl::GetFlag(FLAGS_authfile);
    if (!auth_file.empty()) {
      absl::StatusOr<kiln::RegistryCredentials> creds = kiln::LoadDockerCredentials(auth_file, ref->registry);
      if (!creds.ok()) return Fail(std::string(creds.status().message()), 2);
      options.credentials = *std::move(creds);
    }
  }
  absl::StatusOr<int> gzip_level = kiln::ParseGzipLevel(absl::GetFlag(FLAGS_gzip_level));
  if (!gzip_level.ok()) return Fail(std::string(gzip_level.status().message()), 2);
  const std::string cache_dir = kiln::UserCacheDir();
  kiln::LayerCache cache(cache_dir.empty() ? "" : cache_dir + "/layers-v1.json");
  const char* tmp = std::getenv("TMPDIR");
  kiln::PushOptions push{
      .gzip_level = *gzip_level,
      .scratch_dir = tmp != nullptr && *tmp ? tmp : "/tmp",
      .cache = &cache,
      .oci_manifest = absl::GetFlag(FLAGS_oci),
      .parallel = absl::GetFlag(FLAGS_parallel) > 0
                      ? absl::GetFlag(FLAGS_parallel)
                      : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())),
      .make_client = [&] { return std::make_unique<kiln::HttpRegistryClient>(ref->registry, options); },
      .stream_hold_bytes = 8 << 20,
      .on_layer = nullptr};
  // On a terminal, one line of progress rewritten in place four times a
  // second: layers in the registry, bytes sent, current rate.
  const bool terminal = ::isatty(STDERR_FILENO) == 1 && !absl::GetFlag(FLAGS_json);
  std::atomic<uint64_t> sent{0};
  std::atomic<size_t> layers_done{0};
  if (terminal) {
    options.on_sent = [&sent](uint64_t n) { sent += n; };
    push.on_layer = [&layers_done](size_t layers, uint64_t) { layers_done = layers; };
  }
  absl::Notification finished;
  std::thread ticker;
  if (terminal) {
    ticker = std::thread([&] {
      uint64_t last = 0;
      absl::Time last_at = absl::Now();
      do {
        const uint64_t now_sent = sent.load();
        const absl::Time now = absl::Now();
        const double rate = (now_sent - last) / std::max(1e-3, absl::ToDoubleSeconds(now - last_at)) / 1048576.0;
        last = now_sent;
        last_at = now;
        std::fprintf(stderr, "\r\033[Kkiln: %zu layer(s) in the registry, %.1f MiB sent, %.1f MiB/s",
                     layers_done.load(), now_sent / 1048576.0, rate);
        std::fflush(stderr);
      } while (!finished.WaitForNotificationWithTimeout(absl::Milliseconds(250)));
    });
  }
  kiln::HttpRegistryClient client(ref->registry, options);
  const absl::Time start = absl::Now();
  absl::StatusOr<kiln::PushReport> report = kiln::PushImage(archive, *ref, tags, client, push);
  finished.Notify();
  if (ticker.joinable()) ticker.join();
  if (terminal) std::fprintf(stderr, "\r\033[K");
  if (!report.ok()) return Fail(std::string(report.status().message()), 1);
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  int skipped = 0;
  for (const auto& l : report->layers) skipped += l.skipped;
  const std::string image = absl::StrCat(ref->registry, "/", ref->repository, "@", report->manifest_digest);
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json layers = nlohmann::json::array();
    for (const auto& l : report->layers) {
      layers.push_back({{"digest", l.digest}, {"size", l.size}, {"skipped", l.skipped}, {"mounted", l.mounted}});
    }
    std::printf("%s\n", nlohmann::json{{"image", image},
                                       {"manifestDigest", report->manifest_digest},
                                       {"tags", report->tags},
                                       {"layers", layers},
                                       {"bytesUploaded", report->bytes_uploaded},
                                       {"seconds", seconds}}
                            .dump()
                            .c_str());
  } else {
    std::printf("%s\n", image.c_str());
    std::fprintf(stderr, "kiln: pushed %zu layer(s) (%d already there), %.1f MiB in %.1f s\n", report->layers.size(),
                 skipped, report->bytes_uploaded / 1048576.0, seconds);
  }
  return 0;
}
