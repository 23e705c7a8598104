// kiln status, cancel, log, history, workers.
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

}  // namespace kiln
