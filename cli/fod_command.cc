// kiln fod-hash and kiln fod.
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

}  // namespace kiln
