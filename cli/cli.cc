#include "cli/cli.h"

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
namespace {

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

// Runs one unary call with a deadline; `call` issues it on the context.
template <typename Call>
absl::Status UnaryCall(const CliOptions& options, Call call) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return FromCoordinator(call(context), options);
}

int ReportError(const absl::Status& status) {
  Err(absl::StrCat("error: ", Describe(status)));
  return ExitCodeFor(status);
}

// A tree up to this size that the coordinator lacks travels inline with the
// submission (one call) instead of being uploaded first (two or more).
constexpr uint64_t kInlineTreeBytes = 64 << 10;

struct Submitted {
  std::string installable;
  std::string job_id;
  absl::Status error;  // Set when the submission itself failed.
  UploadStats upload;  // What crossed the wire for the source.
};

// One flake to build: its directory (canonical) and attribute.
struct Target {
  std::string text;  // As the user wrote it.
  fs::path dir;
  std::string attr;
  kiln::v1::FodTask fod_task;  // `kiln fod-hash`'s jobs; default: a build.
};

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
    spec->set_fetch_outputs(!options.out_link.empty());
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
                                                BuildView* view = nullptr, std::string* buildset_id = nullptr) {
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

// The view for this run: JSON events with --json; the live status view when
// stderr (where it draws) is a terminal; plain lines otherwise (CI logs,
// pipes, --quiet). stdout carries only results in every case.
std::unique_ptr<BuildView> MakeBuildView(const CliOptions& options, const std::vector<std::string>& installables) {
  if (options.json) return MakeJsonEventView(installables, stderr, options.quiet);
  ViewOptions view{.quiet = options.quiet, .print_build_logs = options.print_build_logs};
  const char* term = std::getenv("TERM");
  const bool terminal = ::isatty(STDERR_FILENO) == 1 && (term == nullptr || std::string_view(term) != "dumb");
  if (!terminal || options.quiet) return MakePlainView(installables, view, stderr);
  // https://no-color.org: any non-empty NO_COLOR turns colours off.
  const char* no_color = std::getenv("NO_COLOR");
  view.color = no_color == nullptr || *no_color == '\0';
  winsize size = {};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 0) view.width = size.ws_col;
  if (size.ws_row > 4) view.max_status_lines = std::min(10, size.ws_row / 2);
  return MakeTerminalView(installables, view, stderr);
}

// Ctrl-C (SIGINT) or SIGTERM while `kiln build` watches its jobs.
//   - On a terminal it asks: cancel the remote builds (then waits for them to
//     stop and exits 130), detach (leaves them running, prints their job ids
//     as --detach does, exits 0), or resume watching.
//   - Elsewhere (CI) nobody can answer: it cancels the remote builds, so an
//     aborted CI job does not leave them running, and exits 130 once they
//     stopped.
// A second signal while asking or cancelling leaves at once (exit 130).
// The signal handler only writes a byte to a pipe; a thread does the rest.
class InterruptHandler {
 public:
  InterruptHandler(const CliOptions& options, BuildView& view, std::vector<std::string> job_ids)
      : options_(options), view_(view), job_ids_(std::move(job_ids)) {
    if (::pipe(pipe_) != 0) return;
    write_fd_.store(pipe_[1]);
    struct sigaction action = {};
    action.sa_handler = &InterruptHandler::OnSignal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    sigaction(SIGINT, &action, &old_int_);
    sigaction(SIGTERM, &action, &old_term_);
    thread_ = std::thread([this] { Run(); });
  }
  ~InterruptHandler() { Stop(); }

  // Restores the signals' handling; the watch is over.
  void Stop() {
    if (!thread_.joinable()) return;
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
    const char quit = 'q';
    (void)!::write(pipe_[1], &quit, 1);
    thread_.join();
    write_fd_.store(-1);
    ::close(pipe_[0]);
    ::close(pipe_[1]);
  }

 private:
  static void OnSignal(int) {
    if (leave_on_signal_.load()) {
      static constexpr char kBye[] = "\nkiln: leaving; the remote builds are not waited for\n";
      (void)!::write(STDERR_FILENO, kBye, sizeof kBye - 1);
      ::_exit(130);
    }
    const int fd = write_fd_.load();
    const char sig = 's';
    if (fd >= 0) (void)!::write(fd, &sig, 1);
  }

  void Run() {
    char c = 0;
    while (::read(pipe_[0], &c, 1) == 1 && c != 'q') {
      const bool interactive = ::isatty(STDIN_FILENO) == 1 && ::isatty(STDERR_FILENO) == 1 && !options_.json;
      if (!interactive) {
        view_.Message("kiln: interrupted: cancelling the remote build(s)");
        leave_on_signal_.store(true);
        CancelAll();
        continue;
      }
      view_.Pause();
      leave_on_signal_.store(true);
      std::fprintf(stderr, "kiln: interrupted: [c]ancel the build(s), [d]etach (they keep running), [r]esume? ");
      std::fflush(stderr);
      char answer[64] = {0};
      const bool got = std::fgets(answer, sizeof answer, stdin) != nullptr;
      const char first = got ? static_cast<char>(std::tolower(static_cast<unsigned char>(answer[0]))) : 'd';
      if (first == 'c') {
        view_.Resume();
        view_.Message("kiln: cancelling the remote build(s)…");
        CancelAll();  // The watchers end as the cancellations land.
        continue;
      }
      if (first == 'd') {
        view_.Finish();
        std::fprintf(stderr, "kiln: detached; the farm keeps building. Follow with: kiln log -f JOB\n");
        for (const std::string& id : job_ids_) std::printf("%s\n", id.c_str());
        std::fflush(stdout);
        std::fflush(stderr);
        std::_Exit(kExitOk);
      }
      leave_on_signal_.store(false);
      view_.Resume();
    }
  }

  void CancelAll() {
    cancelled_.store(true);
    for (const std::string& id : job_ids_) {
      kiln::v1::CancelJobRequest request;
      request.set_job_id(id);
      kiln::v1::CancelJobResponse response;
      absl::Status s = UnaryCall(
          options_, [&](grpc::ClientContext& c) { return Coordinator(options_).CancelJob(&c, request, &response); });
      if (!s.ok() && !absl::IsFailedPrecondition(s)) {
        view_.Message(absl::StrCat("kiln: job ", id, ": cannot cancel: ", Describe(s)));
      }
    }
  }

 public:
  // Whether the user (or CI) cancelled the builds: exit 130, as for an
  // interrupted command.
  bool cancelled() const { return cancelled_.load(); }

 private:
  static inline std::atomic<int> write_fd_{-1};
  static inline std::atomic<bool> leave_on_signal_{false};
  const CliOptions& options_;
  BuildView& view_;
  const std::vector<std::string> job_ids_;
  int pipe_[2] = {-1, -1};
  struct sigaction old_int_ = {};
  struct sigaction old_term_ = {};
  std::atomic<bool> cancelled_{false};
  std::thread thread_;
};

}  // namespace

std::string LocalityKey(const std::string& flake_dir, const std::string& attr) {
  const fs::path dir(flake_dir);
  std::error_code ec;
  for (fs::path p = dir; !p.empty(); p = p.parent_path()) {
    if (fs::exists(p / ".git", ec)) {
      const std::string rel = dir.lexically_relative(p).string();
      return absl::StrCat(rel == "." ? "" : rel, "#", attr);
    }
    if (p == p.root_path()) break;
  }
  return absl::StrCat(flake_dir, "#", attr);
}

// Downloads an output's tree (root entry "out") to `link`: through a
// temporary sibling, then renamed into place, so `link` is either the whole
// output or untouched. An existing file or link there is replaced, a
// non-empty directory is not.
absl::Status DownloadOutput(const CliOptions& options, const kiln::v1::Digest& tree, const std::string& link) {
  const fs::path dest = fs::absolute(link);
  const fs::path temp = dest.parent_path() / absl::StrCat(".", dest.filename().string(), ".kiln-", getpid());
  std::error_code ec;
  fs::remove_all(temp, ec);
  fs::create_directories(temp / "tree", ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", temp.string(), ": ", ec.message()));
  SourceTreeLimits limits;
  limits.max_total_bytes = uint64_t{64} << 30;
  limits.max_entries = uint64_t{1} << 24;
  limits.max_entries_per_directory = uint64_t{1} << 20;
  limits.max_depth = 256;
  limits.allow_external_links = true;  // A store path links to other store paths.
  absl::Status s = DownloadTree(Cas(options), tree, (temp / "tree").string(), (temp / "spool").string(), limits);
  if (s.ok()) {
    if (fs::is_directory(fs::symlink_status(dest, ec)) && !fs::is_empty(dest, ec)) {
      s = absl::AlreadyExistsError(absl::StrCat(dest.string(), " is a directory that is not empty; remove it first"));
    } else if (::rename((temp / "tree" / "out").c_str(), dest.c_str()) != 0) {
      s = absl::InternalError(absl::StrCat("cannot create ", dest.string(), ": ", std::strerror(errno)));
    }
  }
  fs::remove_all(temp, ec);
  return s;
}

// Every flake under the current directory's git work tree (or the current
// directory), as installables "DIR#attr", skipping .git and result links.
absl::StatusOr<std::vector<std::string>> AllFlakes(const std::string& attr) {
  std::error_code ec;
  fs::path root = fs::current_path(ec);
  for (fs::path p = root; !p.empty(); p = p.parent_path()) {
    if (fs::exists(p / ".git", ec)) {
      root = p;
      break;
    }
    if (p == p.root_path()) break;
  }
  absl::StatusOr<std::optional<absl::flat_hash_set<std::string>>> tracked = GitTrackedFiles(root.string());
  if (!tracked.ok()) return tracked.status();
  std::vector<std::string> out;
  if (tracked->has_value()) {
    for (const std::string& path : **tracked) {
      if (path == "flake.nix" || absl::EndsWith(path, "/flake.nix")) {
        out.push_back(absl::StrCat((root / fs::path(path).parent_path()).lexically_normal().string(), "#", attr));
      }
    }
  } else {
    for (fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec), end;
         !ec && it != end; it.increment(ec)) {
      if (it->is_directory() && (it->path().filename() == ".git" || it->is_symlink())) {
        it.disable_recursion_pending();
      } else if (it->path().filename() == "flake.nix" && it->is_regular_file()) {
        out.push_back(absl::StrCat(it->path().parent_path().string(), "#", attr));
      }
    }
  }
  std::sort(out.begin(), out.end());
  if (out.empty()) return absl::NotFoundError(absl::StrCat("no flake.nix under ", root.string()));
  return out;
}

// The targets listed in a kiln.json: {"targets": [{"flake": "services/a",
// "attr": "oci-image"}, …]} (or the bare array), paths relative to the file.
absl::StatusOr<std::vector<std::string>> TargetsFromFile(const std::string& file) {
  std::ifstream in(file);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", file));
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(file, " is not valid JSON"));
  const nlohmann::json& list = j.is_object() && j.contains("targets") ? j["targets"] : j;
  if (!list.is_array() || list.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": expected {\"targets\": [{\"flake\": DIR, \"attr\": NAME}, …]}"));
  }
  std::error_code ec;
  const fs::path base = fs::absolute(file, ec).parent_path();
  std::vector<std::string> out;
  for (const nlohmann::json& t : list) {
    if (!t.is_object() || !t.contains("flake") || !t["flake"].is_string() ||
        (t.contains("attr") && !t["attr"].is_string())) {
      return absl::InvalidArgumentError(absl::StrCat(file,
                                                     ": each target needs \"flake\" (a directory) and may "
                                                     "have \"attr\" (default \"default\"): ",
                                                     t.dump()));
    }
    const std::string attr = t.contains("attr") ? t["attr"].get<std::string>() : "default";
    out.push_back(absl::StrCat((base / t["flake"].get<std::string>()).lexically_normal().string(), "#", attr));
  }
  return out;
}

int RunBuildCommand(const CliOptions& options, const std::vector<std::string>& given) {
  std::vector<std::string> installables = given;
  if (!options.targets_file.empty()) {
    absl::StatusOr<std::vector<std::string>> listed = TargetsFromFile(options.targets_file);
    if (!listed.ok()) return ReportError(listed.status());
    installables.insert(installables.end(), listed->begin(), listed->end());
  }
  if (options.all_flakes) {
    absl::StatusOr<std::vector<std::string>> found = AllFlakes(options.attr);
    if (!found.ok()) return ReportError(found.status());
    installables.insert(installables.end(), found->begin(), found->end());
  }
  if (installables.empty()) {
    Err("error: 'kiln build' needs at least one installable (PATH#ATTR), or --all-flakes");
    return kExitUsage;
  }
  BuildService::Stub& stub = Coordinator(options);
  std::unique_ptr<BuildView> view = MakeBuildView(options, installables);
  auto say = [&](const std::string& text) { view->Message(text); };

  // One tree for all of them, uploaded once, and one buildset: the farm
  // builds the targets in parallel.
  std::vector<Submitted> jobs;
  std::vector<Target> targets;
  std::vector<size_t> target_job;  // Index into `jobs` of each target.
  int exit_code = kExitOk;
  for (const auto& text : installables) {
    Submitted s{.installable = text, .job_id = "", .error = absl::OkStatus(), .upload = {}};
    absl::StatusOr<Target> target = ResolveTarget(text);
    if (target.ok()) {
      targets.push_back(*std::move(target));
      target_job.push_back(jobs.size());
    } else {
      s.error = target.status();
      say(absl::StrCat("error: ", text, ": ", Describe(target.status())));
      exit_code = std::max(exit_code, ExitCodeFor(target.status()));
    }
    jobs.push_back(std::move(s));
  }
  std::string buildset_id;  // Once submitted.
  if (!targets.empty()) {
    UploadStats upload;
    absl::StatusOr<std::vector<std::string>> ids = Submit(stub, options, targets, upload, view.get(), &buildset_id);
    for (size_t i = 0; i < targets.size(); ++i) {
      Submitted& s = jobs[target_job[i]];
      s.upload = upload;
      if (ids.ok()) {
        s.job_id = (*ids)[i];
        view->Submitted(target_job[i], s.job_id);
      } else {
        s.error = ids.status();
      }
    }
    if (!ids.ok()) {
      say(absl::StrCat("error: ", Describe(ids.status())));
      exit_code = std::max(exit_code, ExitCodeFor(ids.status()));
    } else if (!options.quiet && targets.size() > 1) {
      say(absl::StrFormat("kiln: submitted %d target(s) as one buildset", targets.size()));
    }
  }

  if (options.detach) {
    view->Finish();
    // Submitted (and stored): the farm builds without us watching.
    nlohmann::json submitted = nlohmann::json::array();
    for (const auto& job : jobs) {
      if (!job.error.ok()) continue;
      submitted.push_back({{"installable", job.installable},
                           {"jobId", job.job_id},
                           {"status", "submitted"},
                           {"upload",
                            {{"blobs", job.upload.blobs_sent},
                             {"bytes", job.upload.bytes_sent},
                             {"roundTrips", job.upload.round_trips},
                             {"digestsAsked", job.upload.digests_asked}}}});
      if (!options.json) std::printf("%s\n", job.job_id.c_str());
    }
    if (options.json) std::printf("%s\n", submitted.dump().c_str());
    return exit_code;
  }

  // Watch every job at once (a buildset's targets build in parallel, and
  // their logs interleave line by line, each tagged); report in order after.
  struct Watched {
    absl::StatusOr<JobEvent::Finished> finished = absl::UnknownError("not watched");
    absl::flat_hash_set<std::string> shown_errors;
  };
  std::vector<Watched> watched(jobs.size());
  std::vector<std::string> submitted_ids;
  for (const auto& job : jobs) {
    if (job.error.ok()) submitted_ids.push_back(job.job_id);
  }
  InterruptHandler interrupts(options, *view, submitted_ids);
  {
    std::atomic<size_t> next{0};
    const auto watch_some = [&] {
      for (size_t i = next++; i < jobs.size(); i = next++) {
        if (!jobs[i].error.ok()) continue;
        watched[i].finished = Watch(stub, options, *view, i, jobs[i].job_id, watched[i].shown_errors);
      }
    };
    constexpr size_t kMaxWatchers = 32;
    std::vector<std::thread> threads;
    for (size_t t = 1; t < std::min(kMaxWatchers, jobs.size()); ++t) threads.emplace_back(watch_some);
    watch_some();
    for (auto& t : threads) t.join();
  }
  interrupts.Stop();
  view->Finish();
  if (interrupts.cancelled()) exit_code = kExitInterrupted;

  nlohmann::json json_out = nlohmann::json::array();
  bool lost_coordinator = false;     // Some job's end was never heard.
  std::vector<std::string> summary;  // A line per target, like a CI matrix.
  for (const auto& job : jobs) {
    const size_t index = static_cast<size_t>(&job - &jobs[0]);
    nlohmann::json entry = {{"installable", job.installable}};
    if (!job.error.ok()) {
      entry["status"] = "rejected";
      entry["error"] = std::string(job.error.message());
      json_out.push_back(entry);
      summary.push_back(absl::StrFormat("  %-10s %s", "rejected", job.installable));
      continue;
    }
    entry["jobId"] = job.job_id;
    const absl::flat_hash_set<std::string>& shown_errors = watched[index].shown_errors;
    const absl::StatusOr<JobEvent::Finished>& finished = watched[index].finished;
    if (!buildset_id.empty()) entry["buildsetId"] = buildset_id;
    if (!finished.ok()) {
      lost_coordinator = true;
      summary.push_back(absl::StrFormat("  %-10s %s (job %s)", "unknown", job.installable, job.job_id));
      say(absl::StrCat("error: ", job.installable, ": ", Describe(finished.status())));
      exit_code = std::max(exit_code, ExitCodeFor(finished.status()));
      entry["status"] = "unknown";
      entry["error"] = std::string(finished.status().message());
      json_out.push_back(entry);
      continue;
    }
    const auto& result = finished->result();
    entry["status"] = result.cached() ? "cached" : JobStateName(finished->state());
    entry["cached"] = result.cached();
    if (result.cached()) {
      entry["cachedFromJob"] = result.cached_from_job();
      if (!options.quiet) {
        say(absl::StrFormat("kiln: %s: cached: built by job %s on %s (--rebuild builds it again)", job.installable,
                            result.cached_from_job(), finished->worker()));
      }
    }
    entry["worker"] = finished->worker();
    entry["durationSeconds"] = absl::ToDoubleSeconds(FromProtoDuration(result.build_duration()));
    const double seconds = absl::ToDoubleSeconds(FromProtoDuration(result.build_duration()));
    summary.push_back(absl::StrFormat("  %-10s %s (job %s on %s%s)",
                                      result.cached() ? "cached" : JobStateName(finished->state()), job.installable,
                                      job.job_id, finished->worker().empty() ? "-" : finished->worker(),
                                      result.cached() ? "" : absl::StrFormat(", %.1fs", seconds)));
    if (finished->state() == kiln::v1::JOB_STATE_SUCCEEDED && !options.out_link.empty()) {
      // Like nix build: result, result-1 … for more targets, -OUTPUT for more outputs.
      for (const auto& [name, tree] : result.output_trees()) {
        std::string link = options.out_link;
        if (index > 0) absl::StrAppend(&link, "-", index);
        if (name != "out") absl::StrAppend(&link, "-", name);
        if (absl::Status s = DownloadOutput(options, tree, link); !s.ok()) {
          say(absl::StrCat("error: ", job.installable, ": cannot download output ", name, ": ", s.message()));
          exit_code = std::max(exit_code, kExitUnavailable);
        } else {
          entry["outLinks"][name] = link;
        }
      }
    }
    if (result.has_push() && !result.push().image().empty()) {
      const auto& p = result.push();
      nlohmann::json layers = nlohmann::json::array();
      for (const auto& l : p.layers()) {
        layers.push_back(
            {{"digest", l.digest()}, {"size", l.size()}, {"skipped", l.skipped()}, {"mounted", l.mounted()}});
      }
      entry["pushed"] = {{"image", p.image()},
                         {"manifestDigest", p.manifest_digest()},
                         {"tags", std::vector<std::string>(p.tags().begin(), p.tags().end())},
                         {"size", p.manifest_size() + p.config().size()},
                         {"layers", layers},
                         {"bytesUploaded", p.bytes_uploaded()}};
      for (const auto& l : p.layers()) entry["pushed"]["size"] = entry["pushed"]["size"].get<int64_t>() + l.size();
      if (!options.json) say(absl::StrCat("kiln: ", job.installable, ": pushed ", p.image()));
    }
    if (finished->state() == kiln::v1::JOB_STATE_SUCCEEDED) {
      entry["drvPath"] = result.drv_path();
      entry["outputs"] = nlohmann::json::object();
      for (const auto& [name, path] : result.outputs()) {
        entry["outputs"][name] = path;
        if (!options.json) std::printf("%s\n", path.c_str());
      }
    } else {
      entry["error"] = result.error_message();
      for (const kiln::v1::HashMismatch& m : result.hash_mismatches()) {
        nlohmann::json mj = {{"name", m.name()},
                             {"drvPath", m.drv_path()},
                             {"specified", m.specified()},
                             {"got", m.got()},
                             {"source", m.source()}};
        if (!m.computed_by_job().empty()) mj["computedByJob"] = m.computed_by_job();
        if (!m.computed_by_worker().empty()) mj["computedByWorker"] = m.computed_by_worker();
        entry["hashMismatches"].push_back(std::move(mj));
      }
      // Nix's error lines were already shown live; print only what is new.
      std::vector<std::string> unseen;
      for (absl::string_view line : absl::StrSplit(result.error_message(), '\n')) {
        if (!line.empty() && !shown_errors.contains(line)) unseen.emplace_back(line);
      }
      if (result.error_message().empty()) {
        say(absl::StrCat("error: ", job.installable, ": ", JobStateName(finished->state())));
      } else if (!unseen.empty()) {
        say(absl::StrJoin(unseen, "\n"));
      }
      exit_code = std::max(exit_code, kExitBuildFailed);
    }
    json_out.push_back(entry);
  }
  if (jobs.size() > 1 && !options.quiet) {
    say(absl::StrFormat("kiln: %d target(s):", jobs.size()));
    for (const std::string& line : summary) say(line);
  }
  if (lost_coordinator && !buildset_id.empty()) {
    // The builds may go on without us: say how to find them again.
    say(absl::StrFormat("kiln: the builds may still run on the farm; see them later with: kiln status %s",
                        buildset_id));
  }
  if (options.json) std::printf("%s\n", json_out.dump().c_str());
  std::fflush(stdout);
  return exit_code;
}

namespace {

bool IsBuildsetId(const std::string& id) { return absl::StartsWith(id, "b"); }

nlohmann::json JobJson(const kiln::v1::Job& job) {
  nlohmann::json out = {{"jobId", job.job_id()},
                        {"buildsetId", job.buildset_id()},
                        {"installable", job.spec().display_name()},
                        {"status", JobStateName(job.state())},
                        {"attempt", job.attempt()},
                        {"worker", job.worker()}};
  if (!job.waiting_reason().empty()) out["waitingReason"] = job.waiting_reason();
  if (job.state() == kiln::v1::JOB_STATE_SUCCEEDED) {
    out["drvPath"] = job.result().drv_path();
    out["outputs"] = nlohmann::json::object();
    for (const auto& [name, path] : job.result().outputs()) out["outputs"][name] = path;
  } else if (!job.result().error_message().empty()) {
    out["error"] = job.result().error_message();
  }
  return out;
}

// One line: "job 4 (./svc#a): running on worker-2".
std::string JobLine(const kiln::v1::Job& job) {
  std::string line =
      absl::StrFormat("job %s (%s): %s", job.job_id(), job.spec().display_name(), JobStateName(job.state()));
  if (!job.worker().empty()) absl::StrAppend(&line, " on ", job.worker());
  if (!job.waiting_reason().empty()) absl::StrAppend(&line, " — waiting: ", job.waiting_reason());
  return line;
}

int PrintBuildset(const CliOptions& options, const kiln::v1::Buildset& buildset) {
  std::map<std::string, int> counts;
  nlohmann::json jobs = nlohmann::json::array();
  for (const auto& job : buildset.jobs()) {
    ++counts[JobStateName(job.state())];
    jobs.push_back(JobJson(job));
  }
  if (options.json) {
    nlohmann::json out = {{"buildsetId", buildset.buildset_id()}, {"jobs", jobs}, {"counts", counts}};
    std::printf("%s\n", out.dump().c_str());
    return kExitOk;
  }
  std::vector<std::string> parts;
  for (const auto& [state, n] : counts) parts.push_back(absl::StrCat(n, " ", state));
  std::printf("buildset %s: %d job(s) — %s\n", buildset.buildset_id().c_str(), buildset.jobs_size(),
              absl::StrJoin(parts, ", ").c_str());
  for (const auto& job : buildset.jobs()) Out(absl::StrCat("  ", JobLine(job)));
  return kExitOk;
}

const char* WorkerStateName(kiln::v1::WorkerState state) {
  switch (state) {
    case kiln::v1::WORKER_STATE_CONNECTED: return "connected";
    case kiln::v1::WORKER_STATE_DRAINING: return "draining";
    case kiln::v1::WORKER_STATE_DISCONNECTED: return "disconnected";
    default: return "unknown";
  }
}

nlohmann::json WorkerJson(const kiln::v1::WorkerInfo& w) {
  nlohmann::json out = {
      {"name", w.name()},
      {"state", WorkerStateName(w.state())},
      {"maxJobs", w.max_jobs()},
      {"runningJobs", std::vector<std::string>(w.running_jobs().begin(), w.running_jobs().end())},
      {"systems", std::vector<std::string>(w.systems().begin(), w.systems().end())},
      {"supportedFeatures", std::vector<std::string>(w.supported_features().begin(), w.supported_features().end())},
      {"mandatoryFeatures", std::vector<std::string>(w.mandatory_features().begin(), w.mandatory_features().end())},
      {"labels", std::map<std::string, std::string>(w.labels().begin(), w.labels().end())},
      {"speedFactor", w.speed_factor()}};
  out["loadAverage"] = w.load_average();
  out["memoryUsedFraction"] = w.memory_used_fraction();
  out["storeFreeBytes"] = w.store_free_bytes();
  out["workDirFreeBytes"] = w.work_dir_free_bytes();
  if (!w.over_limit().empty()) out["overLimit"] = w.over_limit();
  if (w.has_lease_until()) {
    out["leaseUntil"] = absl::FormatTime(absl::RFC3339_sec, FromProtoTime(w.lease_until()), absl::UTCTimeZone());
  }
  return out;
}

}  // namespace

int RunStatusCommand(const CliOptions& options, const std::string& id) {
  if (IsBuildsetId(id)) {
    kiln::v1::GetBuildsetRequest request;
    request.set_buildset_id(id);
    kiln::v1::Buildset buildset;
    absl::Status s = UnaryCall(
        options, [&](grpc::ClientContext& c) { return Coordinator(options).GetBuildset(&c, request, &buildset); });
    if (!s.ok()) return ReportError(s);
    return PrintBuildset(options, buildset);
  }
  kiln::v1::GetJobRequest request;
  request.set_job_id(id);
  kiln::v1::Job job;
  absl::Status s =
      UnaryCall(options, [&](grpc::ClientContext& c) { return Coordinator(options).GetJob(&c, request, &job); });
  if (!s.ok()) return ReportError(s);
  if (options.json) {
    std::printf("%s\n", JobJson(job).dump().c_str());
  } else {
    Out(JobLine(job));
    for (const auto& [name, path] : job.result().outputs()) Out(absl::StrCat("  ", name, ": ", path));
    if (!job.result().error_message().empty()) Out(job.result().error_message());
  }
  return kExitOk;
}

namespace {

int ShowJobLog(const CliOptions& options, const std::string& job_id, bool follow, int hops) {
  auto print = [&](const kiln::v1::LogLine& line) {
    if (options.json) {
      nlohmann::json j = {{"derivation", line.derivation()}, {"text", line.text()}};
      if (line.has_time()) j["time"] = FormatTimestamp(FromProtoTime(line.time()));
      std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      std::printf("%s\n", LogLineText(line).c_str());
    }
  };
  kiln::v1::GetJobLogRequest request;
  request.set_job_id(job_id);
  kiln::v1::GetJobLogResponse response;
  absl::Status s = UnaryCall(
      options, [&](grpc::ClientContext& c) { return Coordinator(options).GetJobLog(&c, request, &response); });
  if (!s.ok()) return ReportError(s);
  // A job that shared another's build (an identical job in flight, or a
  // cached result) has that job's log. Hops are bounded: a cached result of
  // a job that itself followed another is two.
  if (!response.log_job_id().empty() && response.lines_size() == 0 && hops < 4) {
    Err(absl::StrCat("kiln: job ", job_id, " shared the build of job ", response.log_job_id(), "; its log:"));
    return ShowJobLog(options, response.log_job_id(), follow, hops + 1);
  }
  const bool finished = response.state() == kiln::v1::JOB_STATE_SUCCEEDED ||
                        response.state() == kiln::v1::JOB_STATE_FAILED ||
                        response.state() == kiln::v1::JOB_STATE_CANCELLED;
  if (!follow || finished) {
    if (response.expired()) {
      Err(absl::StrCat("error: the log of job ", job_id,
                       " was removed by the coordinator's retention limit (kiln-coordinator --log-retention-kb)"));
      return kExitUsage;
    }
    for (const auto& line : response.lines()) print(line);
    std::fflush(stdout);
    if (response.dropped_lines() > 0) {
      Err(absl::StrFormat("kiln: job %s: %d later line(s) were not kept (the per-job log limit)", job_id,
                          response.dropped_lines()));
    }
    if (!follow) return kExitOk;
    return response.state() == kiln::v1::JOB_STATE_SUCCEEDED ? kExitOk : kExitBuildFailed;
  }
  // Following a live job: its events from the start (the coordinator replays
  // the log it holds), then as they come, until it ends.
  class LogOnly final : public BuildView {
   public:
    explicit LogOnly(std::function<void(const kiln::v1::LogLine&)> print) : print_(std::move(print)) {}
    void Submitted(size_t, const std::string&) override {}
    void Event(size_t, const JobEvent& event) override {
      for (const auto& line : event.log().lines()) print_(line);
      if (event.has_log()) std::fflush(stdout);
    }
    void Reconnecting(size_t) override {}
    void Message(const std::string& text) override { Err(text); }

   private:
    std::function<void(const kiln::v1::LogLine&)> print_;
  };
  LogOnly view(print);
  absl::flat_hash_set<std::string> shown;
  absl::StatusOr<JobEvent::Finished> done = Watch(Coordinator(options), options, view, 0, job_id, shown);
  if (!done.ok()) return ReportError(done.status());
  return done->state() == kiln::v1::JOB_STATE_SUCCEEDED ? kExitOk : kExitBuildFailed;
}

}  // namespace

int RunLogCommand(const CliOptions& options, const std::string& job_id, bool follow) {
  return ShowJobLog(options, job_id, follow, 0);
}

int RunHistoryCommand(const CliOptions& options, int limit) {
  kiln::v1::ListBuildsetsRequest request;
  request.set_limit(static_cast<uint32_t>(std::clamp(limit, 1, 1000)));
  kiln::v1::ListBuildsetsResponse response;
  absl::Status s = UnaryCall(
      options, [&](grpc::ClientContext& c) { return Coordinator(options).ListBuildsets(&c, request, &response); });
  if (!s.ok()) return ReportError(s);
  const absl::Time now = absl::Now();
  auto result_text = [](const kiln::v1::BuildsetSummary& b) {
    if (b.unfinished() > 0)
      return absl::StrFormat("running (%d of %d done)", b.targets() - b.unfinished(), b.targets());
    if (b.succeeded() == b.targets()) {
      return b.cached() > 0 ? absl::StrFormat("succeeded (%d cached)", b.cached()) : std::string("succeeded");
    }
    std::vector<std::string> parts;
    if (b.succeeded() > 0) parts.push_back(absl::StrCat(b.succeeded(), " succeeded"));
    if (b.failed() > 0) parts.push_back(absl::StrCat(b.failed(), " failed"));
    if (b.cancelled() > 0) parts.push_back(absl::StrCat(b.cancelled(), " cancelled"));
    return absl::StrJoin(parts, ", ");
  };
  auto seconds = [&](const kiln::v1::BuildsetSummary& b) {
    const absl::Time end = b.has_finished_at() ? FromProtoTime(b.finished_at()) : now;
    return absl::ToDoubleSeconds(end - FromProtoTime(b.submitted_at()));
  };
  if (options.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& b : response.buildsets()) {
      nlohmann::json j = {
          {"buildsetId", b.buildset_id()},
          {"submitter", b.submitter()},
          {"submittedAt", absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", FromProtoTime(b.submitted_at()), absl::UTCTimeZone())},
          {"targets", b.targets()},
          {"succeeded", b.succeeded()},
          {"failed", b.failed()},
          {"cancelled", b.cancelled()},
          {"unfinished", b.unfinished()},
          {"cached", b.cached()},
          {"status", b.unfinished() > 0             ? "running"
                     : b.succeeded() == b.targets() ? "succeeded"
                                                    : "failed"},
          {"durationSeconds", seconds(b)},
          {"installables", std::vector<std::string>(b.installables().begin(), b.installables().end())}};
      if (b.has_finished_at()) {
        j["finishedAt"] = absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", FromProtoTime(b.finished_at()), absl::UTCTimeZone());
      }
      out.push_back(std::move(j));
    }
    std::printf("%s\n", out.dump().c_str());
    return kExitOk;
  }
  std::printf("%-9s %-19s %-20s %7s  %-26s %9s  %s\n", "BUILDSET", "SUBMITTED (UTC)", "BY", "TARGETS", "RESULT",
              "DURATION", "FIRST TARGET");
  for (const auto& b : response.buildsets()) {
    const std::string duration = FormatElapsed(absl::Seconds(seconds(b)));
    Out(absl::StrFormat("%-9s %-19s %-20s %7d  %-26s %9s  %s", b.buildset_id(),
                        absl::FormatTime("%Y-%m-%d %H:%M:%S", FromProtoTime(b.submitted_at()), absl::UTCTimeZone()),
                        b.submitter().substr(0, 20), b.targets(), result_text(b), duration,
                        b.installables().empty() ? "" : b.installables(0)));
  }
  return kExitOk;
}

int RunCancelCommand(const CliOptions& options, const std::string& id) {
  if (IsBuildsetId(id)) {
    kiln::v1::CancelBuildsetRequest request;
    request.set_buildset_id(id);
    kiln::v1::Buildset buildset;
    absl::Status s = UnaryCall(
        options, [&](grpc::ClientContext& c) { return Coordinator(options).CancelBuildset(&c, request, &buildset); });
    if (!s.ok()) return ReportError(s);
    return PrintBuildset(options, buildset);
  }
  kiln::v1::CancelJobRequest request;
  request.set_job_id(id);
  kiln::v1::CancelJobResponse response;
  absl::Status s = UnaryCall(
      options, [&](grpc::ClientContext& c) { return Coordinator(options).CancelJob(&c, request, &response); });
  if (!s.ok()) return ReportError(s);
  Out(absl::StrCat("job ", id, ": ", JobStateName(response.state())));
  return kExitOk;
}

int RunWorkersCommand(const CliOptions& options, const std::vector<std::string>& args) {
  if (!args.empty()) {
    if (args.size() != 2 || (args[0] != "drain" && args[0] != "undrain")) {
      Err("error: usage: kiln workers [drain|undrain NAME]");
      return kExitUsage;
    }
    kiln::v1::DrainWorkerRequest request;
    request.set_name(args[1]);
    request.set_undo(args[0] == "undrain");
    kiln::v1::DrainWorkerResponse response;
    absl::Status s =
        UnaryCall(options, [&](grpc::ClientContext& c) { return Farm(options).DrainWorker(&c, request, &response); });
    if (!s.ok()) return ReportError(s);
    if (options.json) {
      std::printf("%s\n", WorkerJson(response.worker()).dump().c_str());
    } else {
      Out(absl::StrFormat("worker %s: %s, %d job(s) running", response.worker().name(),
                          WorkerStateName(response.worker().state()), response.worker().running_jobs_size()));
    }
    return kExitOk;
  }
  kiln::v1::ListWorkersRequest request;
  kiln::v1::ListWorkersResponse response;
  absl::Status s =
      UnaryCall(options, [&](grpc::ClientContext& c) { return Farm(options).ListWorkers(&c, request, &response); });
  if (!s.ok()) return ReportError(s);
  if (options.json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& w : response.workers()) out.push_back(WorkerJson(w));
    std::printf("%s\n", out.dump().c_str());
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "STATE", "JOBS", "LOAD", "STORE FREE", "SYSTEMS", "FEATURES", "LABELS"}};
  for (const auto& w : response.workers()) {
    std::vector<std::string> features(w.supported_features().begin(), w.supported_features().end());
    for (const auto& f : w.mandatory_features()) features.push_back(absl::StrCat(f, "(mandatory)"));
    std::vector<std::string> labels;
    for (const auto& [k, v] : std::map<std::string, std::string>(w.labels().begin(), w.labels().end())) {
      labels.push_back(absl::StrCat(k, "=", v));
    }
    const std::string state = w.over_limit().empty() || w.state() != kiln::v1::WORKER_STATE_CONNECTED
                                  ? WorkerStateName(w.state())
                                  : absl::StrCat("over limit: ", w.over_limit());
    rows.push_back({w.name(), state, absl::StrCat(w.running_jobs_size(), "/", w.max_jobs()),
                    absl::StrFormat("%.2f", w.load_average()),
                    absl::StrFormat("%.1f GiB", static_cast<double>(w.store_free_bytes()) / (1 << 30)),
                    absl::StrJoin(w.systems(), ","), features.empty() ? "-" : absl::StrJoin(features, ","),
                    labels.empty() ? "-" : absl::StrJoin(labels, ",")});
  }
  std::vector<size_t> width(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      absl::StrAppend(&line, row[i], i + 1 < row.size() ? std::string(width[i] - row[i].size() + 2, ' ') : "");
    }
    Out(line);
  }
  return kExitOk;
}

namespace {

kiln::v1::FodService::Stub& Fods(const CliOptions& options) {
  static auto* stub = kiln::v1::FodService::NewStub(Channel(options)).release();
  return *stub;
}

// Runs one FOD task job per target and returns each job's final result, in
// order (the jobs run in parallel on the farm).
absl::StatusOr<std::vector<kiln::v1::BuildResult>> RunFodJobs(const CliOptions& options,
                                                              const std::vector<Target>& targets) {
  UploadStats uploaded;
  CliOptions quiet_options = options;
  quiet_options.quiet = true;
  absl::StatusOr<std::vector<std::string>> ids = Submit(Coordinator(options), quiet_options, targets, uploaded);
  if (!ids.ok()) return ids.status();
  std::vector<kiln::v1::BuildResult> results;
  absl::flat_hash_set<std::string> shown;
  std::vector<std::string> names;
  for (const Target& t : targets) names.push_back(t.text);
  std::unique_ptr<BuildView> view = MakePlainView(names, ViewOptions{.quiet = options.quiet}, stderr);
  for (size_t i = 0; i < ids->size(); ++i) {
    view->Submitted(i, (*ids)[i]);
    absl::StatusOr<JobEvent::Finished> done = Watch(Coordinator(options), options, *view, i, (*ids)[i], shown);
    if (!done.ok()) return done.status();
    results.push_back(done->result());
  }
  return results;
}

nlohmann::json FodJson(const kiln::v1::FodReport& r, const std::string& status) {
  nlohmann::json j = {{"name", r.name()}, {"drvPath", r.drv_path()}, {"declared", r.declared()},
                      {"status", status}, {"key", r.key()},          {"wholeSource", r.whole_source()}};
  if (!r.correct().empty()) j["correct"] = r.correct();
  if (!r.source().empty()) j["source"] = r.source();
  if (!r.computed_by_job().empty()) j["computedByJob"] = r.computed_by_job();
  if (!r.computed_by_worker().empty()) j["computedByWorker"] = r.computed_by_worker();
  return j;
}

bool IsFake(const std::string& sri) {
  absl::StatusOr<NixHash> h = ParseNixHash(sri);
  return h.ok() && h->IsFake();
}

}  // namespace

int RunFodHashCommand(const CliOptions& options, const std::vector<std::string>& args, bool write) {
  if (args.size() != 1) {
    Err("error: kiln fod-hash takes one installable (PATH#ATTR)");
    return kExitUsage;
  }
  absl::StatusOr<Target> target = ResolveTarget(args[0]);
  if (!target.ok()) return ReportError(target.status());

  // 1. One job evaluates the flake and looks every FOD of its closure up.
  Target scan = *target;
  scan.fod_task.set_mode(kiln::v1::FodTask::MODE_SCAN);
  absl::StatusOr<std::vector<kiln::v1::BuildResult>> scanned = RunFodJobs(options, {scan});
  if (!scanned.ok()) return ReportError(scanned.status());
  const kiln::v1::BuildResult& found = scanned->front();
  if (found.code() != kiln::v1::RESULT_CODE_SUCCEEDED) {
    // Unless quiet, Nix's errors were shown as they came.
    Err(options.quiet ? absl::StrCat("error: ", args[0], ": ", found.error_message())
                      : absl::StrCat("error: ", args[0], ": cannot list its fixed-output derivations"));
    return kExitBuildFailed;
  }

  // 2. One job per FOD whose hash is fake or suspect and not known: they
  // spread over the workers.
  std::vector<kiln::v1::FodReport> reports(found.fod_reports().begin(), found.fod_reports().end());
  std::vector<Target> computes;
  std::vector<size_t> computed_index;
  for (size_t i = 0; i < reports.size(); ++i) {
    const auto& r = reports[i];
    const bool known = r.verdict() == "right" || r.verdict() == "wrong";
    if (known || !(IsFake(r.declared()) || r.verdict() == "suspect")) continue;
    Target t = *target;
    t.text = absl::StrCat(args[0], " (FOD ", r.name(), ")");
    t.fod_task.set_mode(kiln::v1::FodTask::MODE_COMPUTE);
    t.fod_task.add_drv_paths(r.drv_path());
    computes.push_back(std::move(t));
    computed_index.push_back(i);
  }
  int exit_code = kExitOk;
  absl::flat_hash_map<std::string, std::string> failures;  // .drv -> why, in one line.
  if (!computes.empty()) {
    if (!options.quiet) Err(absl::StrFormat("kiln: computing %d FOD hash(es) on the farm", computes.size()));
    absl::StatusOr<std::vector<kiln::v1::BuildResult>> computed = RunFodJobs(options, computes);
    if (!computed.ok()) return ReportError(computed.status());
    for (size_t k = 0; k < computed->size(); ++k) {
      kiln::v1::FodReport& r = reports[computed_index[k]];
      const auto& result = (*computed)[k];
      if (result.fod_reports_size() == 1 && !result.fod_reports(0).correct().empty()) {
        r.set_correct(result.fod_reports(0).correct());
        r.set_source("computed");
        r.set_computed_by_job(result.fod_reports(0).computed_by_job());
        r.set_verdict("computed");
      } else {
        r.set_verdict("failed");
        failures[r.drv_path()] = OneLineNixError(result.error_message());
        Err(absl::StrCat("error: FOD '", r.name(), "' could not be computed: ", failures[r.drv_path()]));
        exit_code = kExitBuildFailed;
      }
    }
  }

  // 3. A line per FOD; the fixes.
  std::vector<FodHashFix> fixes, others;
  nlohmann::json out = {{"fods", nlohmann::json::array()}};
  for (const auto& r : reports) {
    std::string status;
    if (r.verdict() == "failed") {
      status = "failed";
    } else if (!r.correct().empty() && r.correct() == r.declared()) {
      status = "right";
      others.push_back({r.name(), r.declared(), r.correct()});
    } else if (!r.correct().empty()) {
      status = IsFake(r.declared()) ? "fake" : "stale";
      fixes.push_back({r.name(), r.declared(), r.correct()});
    } else {
      status = r.verdict() == "nondeterministic" ? "nondeterministic" : "unverified";
      others.push_back({r.name(), r.declared(), r.declared()});
    }
    out["fods"].push_back(FodJson(r, status));
    if (auto f = failures.find(r.drv_path()); f != failures.end()) out["fods"].back()["error"] = f->second;
    if (!options.json) {
      std::string line = absl::StrFormat("%-28s %-11s", r.name(), status);
      if (status == "fake" || status == "stale") {
        absl::StrAppend(&line, " ", r.declared(), " -> ", r.correct(),
                        r.source() == "cache"
                            ? absl::StrCat("  (cached: job ", r.computed_by_job(), " on ", r.computed_by_worker(), ")")
                            : absl::StrCat("  (computed: job ", r.computed_by_job(), ")"));
      } else if (status == "right") {
        absl::StrAppend(&line, " ", r.declared(), r.source() == "computed" ? "  (computed)" : "  (cached)");
      } else if (status == "failed") {
        absl::StrAppend(&line, " ", r.declared(), "  (not computed: see the error above)");
      } else if (status == "unverified") {
        absl::StrAppend(&line, " ", r.declared(), "  (never computed by Kiln; a build verifies it)");
      } else {
        absl::StrAppend(&line, " ", r.declared());
      }
      Out(line);
    }
    if (r.whole_source() && !options.quiet) {
      Err(
          absl::StrFormat("kiln: note: FOD '%s' takes the whole flake source as an input: every edit of the flake "
                          "changes its inputs, so its hash is recomputed each time; give it only the files it "
                          "needs (e.g. the lockfile)",
                          r.name()));
    }
  }
  if (!fixes.empty()) {
    absl::StatusOr<HashEditPlan> plan = PlanHashEdits(target->dir.string(), fixes, others);
    if (!plan.ok()) return ReportError(plan.status());
    out["edits"] = nlohmann::json::array();
    for (const HashEdit& e : plan->edits) {
      out["edits"].push_back({{"file", e.file}, {"line", e.line}, {"before", e.before}, {"after", e.after}});
    }
    out["leftToDo"] = plan->left_to_do;
    if (write) {
      if (absl::Status s = ApplyHashEdits(target->dir.string(), *plan); !s.ok()) return ReportError(s);
    }
    if (!options.json) {
      for (const HashEdit& e : plan->edits) {
        std::printf("%s %s:%d: %s\n", write ? "edited" : "would edit", e.file.c_str(), e.line,
                    std::string(absl::StripAsciiWhitespace(e.after)).c_str());
      }
      for (const std::string& todo : plan->left_to_do) std::printf("to do: %s\n", todo.c_str());
      if (!write && !plan->edits.empty()) std::printf("(kiln fod-hash --write makes these edits)\n");
    }
    if (!write || !plan->left_to_do.empty()) exit_code = std::max(exit_code, kExitBuildFailed);
  }
  if (options.json) std::printf("%s\n", out.dump().c_str());
  return exit_code;
}

int RunFodCommand(const CliOptions& options, const std::vector<std::string>& args, const std::string& name) {
  const std::string sub = args.empty() ? "" : args[0];
  const std::vector<std::string> rest(args.begin() + (args.empty() ? 0 : 1), args.end());
  google::protobuf::util::JsonPrintOptions json_options;
  json_options.preserve_proto_field_names = true;
  if (sub == "list" || sub == "show" || sub == "export") {
    kiln::v1::ListFodsRequest request;
    request.set_name(name);
    if (sub == "show") {
      if (rest.size() != 1) {
        Err("error: kiln fod show KEY_PREFIX");
        return kExitUsage;
      }
      request.set_key_prefix(rest[0]);
    }
    kiln::v1::ListFodsResponse response;
    absl::Status s =
        UnaryCall(options, [&](grpc::ClientContext& c) { return Fods(options).ListFods(&c, request, &response); });
    if (!s.ok()) return ReportError(s);
    if (sub == "show" && response.entries().empty()) {
      Err(absl::StrCat("error: no FOD entry has a key starting with ", rest[0]));
      return kExitBuildFailed;
    }
    for (const auto& e : response.entries()) {
      if (sub == "export" || options.json) {
        std::string line;
        (void)google::protobuf::util::MessageToJsonString(e, &line, json_options);
        std::printf("%s\n", line.c_str());
      } else if (sub == "list") {
        std::printf("%s  %-28s %s%s\n", e.key().substr(0, 12).c_str(), e.name().c_str(), e.hash().c_str(),
                    e.nondeterministic() ? "  NONDETERMINISTIC" : "");
      } else {
        constexpr char kTime[] = "%Y-%m-%d %H:%M:%S UTC";
        std::printf(
            "key:           %s\nname:          %s\nhash:          %s\nalgo/mode:     %s/%s\n"
            "computed:      %s by job %s on %s\nlast verified: %s\nhits:          %llu\n"
            "build time:    %.3f s\ndrv:           %s\n",
            e.key().c_str(), e.name().c_str(), e.hash().c_str(), e.algo().c_str(), e.mode().c_str(),
            absl::FormatTime(kTime, FromProtoTime(e.first_computed()), absl::UTCTimeZone()).c_str(),
            e.computed_by_job().c_str(), e.computed_by_worker().c_str(),
            absl::FormatTime(kTime, FromProtoTime(e.last_verified()), absl::UTCTimeZone()).c_str(),
            static_cast<unsigned long long>(e.hit_count()), e.build_seconds(), e.drv_path().c_str());
        if (e.nondeterministic()) std::printf("NONDETERMINISTIC: another build gave %s\n", e.other_hash().c_str());
      }
    }
    return kExitOk;
  }
  if (sub == "forget") {
    kiln::v1::ForgetFodsRequest request;
    for (const std::string& k : rest) request.add_key_prefixes(k);
    request.set_name(name);
    kiln::v1::ForgetFodsResponse response;
    absl::Status s =
        UnaryCall(options, [&](grpc::ClientContext& c) { return Fods(options).ForgetFods(&c, request, &response); });
    if (!s.ok()) return ReportError(s);
    std::printf("forgot %u FOD entr%s\n", response.forgotten(), response.forgotten() == 1 ? "y" : "ies");
    return kExitOk;
  }
  if (sub == "import" && rest.size() == 1) {
    std::ifstream in(rest[0]);
    if (!in) return ReportError(absl::NotFoundError(absl::StrCat("cannot read ", rest[0])));
    kiln::v1::ImportFodsRequest request;
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
      if (absl::StripAsciiWhitespace(line).empty()) continue;
      if (!google::protobuf::util::JsonStringToMessage(line, request.add_entries()).ok()) {
        return ReportError(absl::InvalidArgumentError(absl::StrCat(rest[0], ":", n, ": not a FOD entry")));
      }
    }
    kiln::v1::ImportFodsResponse response;
    absl::Status s =
        UnaryCall(options, [&](grpc::ClientContext& c) { return Fods(options).ImportFods(&c, request, &response); });
    if (!s.ok()) return ReportError(s);
    std::printf("imported %u, already known %u, conflicting %u (marked nondeterministic)\n", response.imported(),
                response.skipped(), response.conflicts());
    return kExitOk;
  }
  Err("error: kiln fod list|show KEY|forget KEY...|export|import FILE [--name=NAME]");
  return kExitUsage;
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
