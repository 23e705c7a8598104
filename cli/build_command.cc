// kiln build: upload, submit, follow, fetch outputs.
#include "cli/cli.h"
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
#include "cli/farm_fetch.h"
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
#include "cli/farm_fetch.h"
#include "cli/fod_edit.h"
#include "kiln/v1/fod.grpc.pb.h"
#include <google/protobuf/util/json_util.h>
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/farm.grpc.pb.h"

namespace kiln {
namespace fs = std::filesystem;

using kiln::v1::BuildService;
using kiln::v1::JobEvent;

namespace {

struct Submitted {
  std::string installable;
  std::string job_id;
  absl::Status error;  // Set when the submission itself failed.
  UploadStats upload;  // What crossed the wire for the source.
};

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

int RunBuildCommand(const CliOptions& given_options, const std::vector<std::string>& given) {
  CliOptions options = given_options;
  if (!options.out_link.empty() && options.out_link_mode == "auto") {
    options.out_link_mode = LocalNixStoreUsable() ? "store" : "files";
  }
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
    if (finished->state() == kiln::v1::JOB_STATE_SUCCEEDED && !options.out_link.empty() &&
        options.out_link_mode == "store") {
      // Like nix build: result, result-1 … for more targets, -OUTPUT for more outputs.
      std::vector<std::string> paths;
      for (const auto& [name, path] : result.outputs()) paths.push_back(path);
      GrpcFarmStoreClient farm(Channel(options));
      absl::StatusOr<FarmFetchReport> fetched = FetchFromFarm(farm, paths, say);
      if (!fetched.ok()) {
        say(absl::StrCat("error: ", job.installable,
                         ": cannot fetch the outputs from the farm store: ", fetched.status().message()));
        exit_code = std::max(exit_code, kExitUnavailable);
      } else {
        if (fetched->fetched > 0 && !options.quiet && !options.json) {
          say(absl::StrFormat("kiln: %s: fetched %d path(s), %.1f MiB, from the farm store", job.installable,
                              fetched->fetched, static_cast<double>(fetched->nar_bytes) / (1 << 20)));
        }
        entry["fetchedPaths"] = fetched->fetched;
        for (const auto& [name, path] : result.outputs()) {
          std::string link = options.out_link;
          if (index > 0) absl::StrAppend(&link, "-", index);
          if (name != "out") absl::StrAppend(&link, "-", name);
          if (absl::Status s = AddGcRootLink(path, link); !s.ok()) {
            say(absl::StrCat("error: ", job.installable, ": cannot link output ", name, ": ", s.message()));
            exit_code = std::max(exit_code, kExitUnavailable);
          } else {
            entry["outLinks"][name] = link;
          }
        }
      }
    }
    if (finished->state() == kiln::v1::JOB_STATE_SUCCEEDED && !options.out_link.empty() &&
        options.out_link_mode == "files") {
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

}  // namespace kiln
