#include "cli/client.h"

#include <signal.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/cas_client.h"
#include "common/cli_args.h"
#include "common/clock.h"
#include "common/digest.h"
#include "common/grpc_util.h"
#include "common/installable.h"
#include "common/nix_hash.h"
#include "common/nix_log.h"
#include "common/source_tree.h"
#include "cli/build_view.h"
#include "cli/fod_edit.h"
#include "kiln/v1/fod.grpc.pb.h"
#include <google/protobuf/util/json_util.h>
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/farm.grpc.pb.h"

namespace kiln {
namespace fs = std::filesystem;

using kiln::v1::BuildService;
using kiln::v1::JobEvent;

// Messages may quote what came from elsewhere (ids, names, another user's
// target): control characters are shown, not acted on.
void Err(const std::string& text) { std::fprintf(stderr, "%s\n", TerminalSafe(text).c_str()); }

// A line for people on stdout, likewise.
void Out(const std::string& text) { std::printf("%s\n", TerminalSafe(text).c_str()); }

int ExitCodeFor(const absl::Status& status) {
  if (absl::IsResourceExhausted(status) && absl::StrContains(status.message(), kCoordinatorOutOfSpace)) {
    return kExitCoordinatorOutOfSpace;
  }
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnauthenticated: return kExitUsage;
    default: return kExitUnavailable;
  }
}

// A status for people: its message, led by the code's name when the code
// tells them what kind of refusal it is (credentials, scopes).
std::string Describe(const absl::Status& status) {
  if (absl::IsPermissionDenied(status) || absl::IsUnauthenticated(status)) {
    return absl::StrCat(absl::StatusCodeToString(status.code()), ": ", status.message());
  }
  return std::string(status.message());
}

std::string Submitter() {
  const char* user = std::getenv("USER");
  char host[256] = {0};
  gethostname(host, sizeof host - 1);
  return absl::StrCat(user ? user : "unknown", "@", host);
}

// One channel and stub for the whole (short-lived) process, never destroyed:
// main() leaves through _Exit, so gRPC's teardown — which would only add time
// to every command — never runs.
std::shared_ptr<grpc::Channel> Channel(const CliOptions& options) {
  static auto* channel = [&] {
    auto* c = new std::shared_ptr<grpc::Channel>(MakeChannel(options.coordinator, options.credentials, options.token));
    // Start connecting now, while the caller hashes its sources.
    (*c)->GetState(/*try_to_connect=*/true);
    return c;
  }();
  return *channel;
}

BuildService::Stub& Coordinator(const CliOptions& options) {
  static BuildService::Stub* stub = BuildService::NewStub(Channel(options)).release();
  return *stub;
}

kiln::v1::CasService::Stub& Cas(const CliOptions& options) {
  static kiln::v1::CasService::Stub* stub = kiln::v1::CasService::NewStub(Channel(options)).release();
  return *stub;
}

// Where the CLI remembers file digests between runs (see DigestCache).
std::string DigestCachePath() {
  const std::string dir = UserCacheDir();
  return dir.empty() ? "" : (fs::path(dir) / "digests-v1").string();
}

kiln::v1::FarmService::Stub& Farm(const CliOptions& options) {
  static kiln::v1::FarmService::Stub* stub = kiln::v1::FarmService::NewStub(Channel(options)).release();
  return *stub;
}

// A call's status as the user should read it: an unreachable coordinator is
// named, with how to point the CLI at another one.
absl::Status FromCoordinator(const grpc::Status& status, const CliOptions& options) {
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach the Kiln coordinator at ", options.coordinator,
                     " (set it with --coordinator or KILN_COORDINATOR): ", status.error_message()));
  }
  return FromGrpcStatus(status);
}

int ReportError(const absl::Status& status) {
  Err(absl::StrCat("error: ", Describe(status)));
  return ExitCodeFor(status);
}

// A tree up to this size that the coordinator lacks travels inline with the
// submission (one call) instead of being uploaded first (two or more).
constexpr uint64_t kInlineTreeBytes = 64 << 10;

absl::StatusOr<Target> ResolveTarget(const std::string& text) {
  absl::StatusOr<Installable> installable = ParseInstallable(text);
  if (!installable.ok()) return installable.status();
  std::error_code ec;
  const fs::path dir = fs::canonical(installable->flake_dir, ec);
  if (ec || !fs::is_directory(dir)) {
    return absl::NotFoundError(absl::StrCat("'", installable->flake_dir, "' is not a directory"));
  }
  if (!fs::exists(dir / "flake.nix")) {
    return absl::NotFoundError(absl::StrCat("path '", dir.string(), "' does not contain a 'flake.nix'"));
  }
  return Target{.text = text, .dir = dir, .attr = installable->attr, .fod_task = {}};
}

// The directory whose tree carries every target: their deepest common
// directory (the one flake's own for a single target). Each job needs only
// its flake's directory, so nothing above that is sent.
fs::path SourceRoot(const std::vector<Target>& targets) {
  fs::path common = targets[0].dir;
  for (const Target& t : targets) {
    while (!common.empty() && t.dir.lexically_relative(common).string().rfind("..", 0) == 0) {
      common = common.parent_path();
    }
  }
  return common;
}

// Uploads the tree at `root` (only what the coordinator lacks) and submits
// every target as one buildset; job ids in target order.
absl::StatusOr<std::vector<std::string>> SubmitOnce(BuildService::Stub& stub, const CliOptions& options,
                                                    const std::vector<Target>& targets, UploadStats& uploaded,
                                                    BuildView* view, std::string* buildset_id) {
  const fs::path root = SourceRoot(targets);
  // Nix's view of the flake: inside a git work tree, the tracked files only.
  absl::StatusOr<std::optional<absl::flat_hash_set<std::string>>> tracked = GitTrackedFiles(root.string());
  if (!tracked.ok()) return tracked.status();
  if (tracked->has_value()) {
    // Untracked, it would not be sent, and the worker would find no flake:
    // say so here, with the fix, as Nix does.
    for (const Target& t : targets) {
      const fs::path flake = (t.dir / "flake.nix").lexically_relative(root);
      if ((*tracked)->contains(flake.string()) || !fs::exists(t.dir / "flake.nix")) continue;
      return absl::FailedPreconditionError(
          absl::StrCat("'", (t.dir / "flake.nix").string(),
                       "' is not tracked by Git: in a Git repository a flake is its tracked "
                       "files only (as for Nix). Run: git -C '",
                       root.string(), "' add '", flake.string(), "'"));
    }
  }
  const std::string cache_path = DigestCachePath();
  std::optional<DigestCache> cache;
  if (!cache_path.empty()) cache.emplace(cache_path);
  SourceTreeLimits limits;
  limits.max_total_bytes = uint64_t{4} << 30;  // The coordinator applies its own limit.
  absl::StatusOr<SourceTree> tree = BuildSourceTree(root.string(), limits,
                                                    {.keep_file_data = false,
                                                     .digest_cache = cache ? &*cache : nullptr,
                                                     .only = tracked->has_value() ? &**tracked : nullptr});
  if (!tree.ok()) return tree.status();
  if (cache) cache->Save().IgnoreError();  // A cache: failing to keep it costs only time.
  // Only what the coordinator lacks crosses the wire. A small tree it lacks
  // goes inline with the submission: cheaper than more round trips.
  bool send_inline = false;
  absl::Status upload_status;
  if (tree->total_bytes <= kInlineTreeBytes) {
    absl::StatusOr<bool> has = HasDirectory(Cas(options), tree->root);
    uploaded.round_trips = 1;
    uploaded.digests_asked = 1;
    upload_status = has.status();
    send_inline = has.ok() && !*has;
  } else {
    upload_status = UploadTree(Cas(options), *tree, &uploaded);
  }
  if (!upload_status.ok()) {
    if (absl::IsUnavailable(upload_status)) {
      return FromCoordinator(grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(upload_status.message())),
                             options);
    }
    return upload_status;
  }

  kiln::v1::SubmitBuildRequest request;
  for (const Target& target : targets) {
    auto* spec = request.add_targets()->mutable_spec();
    *spec->mutable_source()->mutable_tree_root() = tree->root;
    const std::string subdir = target.dir.lexically_relative(root).string();
    spec->mutable_source()->set_flake_subdir(subdir == "." ? "" : subdir);
    spec->set_attr(target.attr);
    spec->mutable_requirements()->set_system(options.system);
    spec->set_display_name(target.text);
    spec->set_priority_class(options.priority);
    for (const auto& [k, v] : options.labels) (*spec->mutable_requirements()->mutable_pinned_labels())[k] = v;
    spec->set_rebuild(options.rebuild);
    spec->set_fetch_outputs(!options.out_link.empty() && options.out_link_mode == "files");
    if (options.timeout_seconds > 0) spec->mutable_timeout()->set_seconds(options.timeout_seconds);
    if (options.max_silent_time_seconds > 0) {
      spec->mutable_max_silent_time()->set_seconds(options.max_silent_time_seconds);
    }
    spec->set_locality_key(LocalityKey(target.dir.string(), target.attr));
    if (target.fod_task.mode() != kiln::v1::FodTask::MODE_BUILD) *spec->mutable_fod_task() = target.fod_task;
    if (!options.push.empty()) {
      const size_t slash = options.push.rfind('/');
      const size_t colon = options.push.rfind(':');
      const bool has_tag = colon != std::string::npos && (slash == std::string::npos || colon > slash);
      spec->mutable_push()->set_repository(has_tag ? options.push.substr(0, colon) : options.push);
      if (has_tag) spec->mutable_push()->add_tags(options.push.substr(colon + 1));
      for (const std::string& tag : options.tags) spec->mutable_push()->add_tags(tag);
      spec->mutable_push()->set_manifest_format(options.oci_manifest ? kiln::v1::MANIFEST_FORMAT_OCI
                                                                     : kiln::v1::MANIFEST_FORMAT_DOCKER_V2);
    }
  }
  if (send_inline) {
    for (const auto& [hash, data] : tree->blobs) {
      kiln::v1::Blob* blob = request.add_blobs();
      blob->mutable_digest()->set_hash(hash);
      blob->mutable_digest()->set_size_bytes(static_cast<int64_t>(data.size()));
      blob->set_data(data);
    }
    for (const auto& [hash, path] : tree->file_paths) {
      std::string data;
      if (!ReadWholeFile(path, data).ok() || Sha256Hex(data) != hash) {
        return absl::AbortedError(absl::StrCat(path, " changed while it was being sent; run the command again"));
      }
      kiln::v1::Blob* blob = request.add_blobs();
      blob->mutable_digest()->set_hash(hash);
      blob->mutable_digest()->set_size_bytes(static_cast<int64_t>(data.size()));
      blob->set_data(std::move(data));
      ++uploaded.blobs_sent;
      uploaded.bytes_sent += blob->data().size();
    }
    uploaded.blobs_sent += tree->blobs.size();
    for (const auto& [hash, data] : tree->blobs) uploaded.bytes_sent += data.size();
  }
  request.set_submitter(Submitter());
  if (view != nullptr && !options.quiet && uploaded.blobs_sent > 0) {
    view->Message(absl::StrFormat("kiln: %s: uploaded %d blob(s), %s", root.string(), uploaded.blobs_sent,
                                  uploaded.bytes_sent >= (1 << 20)
                                      ? absl::StrFormat("%.1f MiB", uploaded.bytes_sent / 1048576.0)
                                      : absl::StrCat(uploaded.bytes_sent, " bytes")));
  }
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  kiln::v1::SubmitBuildResponse response;
  grpc::Status status = stub.SubmitBuild(&context, request, &response);
  if (!status.ok()) return FromCoordinator(status, options);
  if (buildset_id != nullptr) *buildset_id = response.buildset_id();
  return std::vector<std::string>(response.job_ids().begin(), response.job_ids().end());
}

absl::StatusOr<std::vector<std::string>> Submit(BuildService::Stub& stub, const CliOptions& options,
                                                const std::vector<Target>& targets, UploadStats& uploaded,
                                                BuildView* view, std::string* buildset_id) {
  absl::StatusOr<std::vector<std::string>> ids = SubmitOnce(stub, options, targets, uploaded, view, buildset_id);
  // The coordinator's garbage collection can take a blob between our
  // question and our upload or submission: ask again, once.
  if (absl::IsFailedPrecondition(ids.status()) ||
      (absl::IsNotFound(ids.status()) && absl::StrContains(ids.status().message(), "neither uploaded"))) {
    ids = SubmitOnce(stub, options, targets, uploaded, view, buildset_id);
  }
  return ids;
}

// Passes one job's events to `view` until its terminal event; resumes after
// a broken stream (e.g. a coordinator restart) from the last event seen.
absl::StatusOr<JobEvent::Finished> Watch(BuildService::Stub& stub, const CliOptions& options, BuildView& view,
                                         size_t index, const std::string& job_id,
                                         absl::flat_hash_set<std::string>& shown_errors) {
  uint64_t next_sequence = 0, incarnation = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(options.watch_retry_seconds);
  absl::Duration backoff = absl::Milliseconds(200);
  for (;;) {
    grpc::ClientContext context;
    kiln::v1::WatchJobRequest request;
    request.set_job_id(job_id);
    request.set_from_sequence(next_sequence);
    request.set_incarnation(incarnation);
    auto reader = stub.WatchJob(&context, request);
    JobEvent event;
    std::optional<JobEvent::Finished> finished;
    while (reader->Read(&event)) {
      next_sequence = event.sequence() + 1;
      incarnation = event.incarnation();
      backoff = absl::Milliseconds(200);
      if (event.has_log()) {
        for (const auto& line : event.log().lines()) {
          if (line.derivation().empty() && absl::StartsWith(line.text(), "error:")) shown_errors.insert(line.text());
        }
      }
      // The coordinator ends the stream right after the finished event.
      if (event.has_finished()) finished = event.finished();
      view.Event(index, event);
    }
    grpc::Status status = reader->Finish();
    if (finished) return *finished;
    const absl::Status s = FromGrpcStatus(status);
    if (!s.ok() && s.code() != absl::StatusCode::kUnavailable && s.code() != absl::StatusCode::kCancelled) {
      return s;
    }
    if (absl::Now() >= give_up) {
      return absl::UnavailableError(absl::StrCat("lost the coordinator while watching job ", job_id, ": ",
                                                 s.ok() ? "stream ended" : s.message()));
    }
    view.Reconnecting(index);
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(5));
  }
}

absl::StatusOr<std::string> LoadClientToken() {
  if (const char* env = std::getenv("KILN_TOKEN"); env != nullptr && *env) {
    return std::string(absl::StripAsciiWhitespace(env));
  }
  std::string dir;
  if (const char* xdg = std::getenv("XDG_CONFIG_HOME"); xdg != nullptr && *xdg) {
    dir = xdg;
  } else if (const char* home = std::getenv("HOME"); home != nullptr && *home) {
    dir = absl::StrCat(home, "/.config");
  } else {
    return std::string();
  }
  absl::StatusOr<std::string> token = ReadPrivateTokenFile(dir + "/kiln/token");
  if (absl::IsNotFound(token.status())) return std::string();  // No token: calls go without.
  return token;
}

}  // namespace kiln
