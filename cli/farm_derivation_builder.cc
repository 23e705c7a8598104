#include "cli/farm_derivation_builder.h"

#include <grpcpp/grpcpp.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>

#include <atomic>
#include <thread>

#include <chrono>
#include <optional>

#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "cli/client.h"
#include "common/digest.h"
#include "common/grpc_util.h"
#include "common/hash_mismatch.h"
#include "common/narinfo.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// The empty source tree a derivation job carries: an empty Directory.
kiln::v1::Digest EmptyTree() {
  kiln::v1::Digest d;
  d.set_hash(Sha256Hex(""));
  d.set_size_bytes(0);
  return d;
}

// Watches `fd` (the session's stdin: a client waiting for its build has
// nothing to say) on a thread of its own: its hang-up calls `on_hangup`,
// once. The destructor wakes the thread through a pipe and joins it, so a
// finished build's answer never waits for the watch (a poll timeout here
// once cost every derivation up to 200 ms).
class HangupWatch {
 public:
  HangupWatch(int fd, absl::AnyInvocable<void()> on_hangup) : on_hangup_(std::move(on_hangup)) {
    if (fd < 0 || ::pipe(wake_) != 0) return;
    thread_ = std::thread([this, fd] {
      pollfd p[2] = {{fd, POLLRDHUP, 0}, {wake_[0], POLLIN, 0}};
      for (;;) {
        const int n = ::poll(p, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || (p[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0) return;  // Stopped.
        if ((p[0].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) != 0) {
          hung_up_ = true;
          on_hangup_();
          return;
        }
      }
    });
  }
  ~HangupWatch() {
    if (thread_.joinable()) {
      ::close(wake_[1]);  // Wakes the poll.
      thread_.join();
      ::close(wake_[0]);
    }
  }
  bool hung_up() const { return hung_up_.load(); }

 private:
  absl::AnyInvocable<void()> on_hangup_;
  int wake_[2] = {-1, -1};
  std::atomic<bool> hung_up_{false};
  std::thread thread_;
};

}  // namespace

kiln::v1::JobSpec DerivationJobSpec(const std::string& drv_path, const ServeDerivation& drv,
                                    const ServeBuildOptions& options, const std::string& priority_class) {
  kiln::v1::JobSpec spec;
  *spec.mutable_source()->mutable_tree_root() = EmptyTree();
  const absl::StatusOr<std::string> hash_part = StorePathHashPart(drv_path);
  // One attribute per derivation: jobs of one derivation in flight share
  // their work, jobs of two never do.
  spec.set_attr(absl::StrCat("kiln-drv-", hash_part.ok() ? *hash_part : "invalid"));
  spec.mutable_requirements()->set_system(drv.platform);
  for (const auto& [key, value] : drv.env) {
    if (key != "requiredSystemFeatures") continue;
    for (absl::string_view f : absl::StrSplit(value, ' ', absl::SkipEmpty())) {
      spec.mutable_requirements()->add_required_features(std::string(f));
    }
  }
  spec.set_priority_class(priority_class);
  if (options.build_timeout > 0) spec.mutable_timeout()->set_seconds(static_cast<int64_t>(options.build_timeout));
  if (options.max_silent_time > 0) {
    spec.mutable_max_silent_time()->set_seconds(static_cast<int64_t>(options.max_silent_time));
  }
  spec.set_display_name(drv_path);
  spec.set_locality_key(spec.attr());
  kiln::v1::DerivationTask& task = *spec.mutable_derivation();
  task.set_drv_path(drv_path);
  ServeWriter w;
  WriteServeDerivation(w, drv);
  task.set_basic_derivation(w.data());
  task.set_max_log_size(options.max_log_size);
  return spec;
}

FarmDerivationBuilder::FarmDerivationBuilder(std::shared_ptr<grpc::Channel> channel, FarmStoreClient& farm,
                                             CliOptions options, int hangup_fd)
    : stub_(kiln::v1::BuildService::NewStub(channel)),
      fods_(kiln::v1::FodService::NewStub(channel)),
      farm_(farm),
      options_(std::move(options)),
      hangup_fd_(hangup_fd) {}

std::optional<ServeBuildResult> FarmDerivationBuilder::FailFastFod(
    const std::string& drv_path, const ServeDerivation& drv, absl::FunctionRef<void(absl::string_view line)> log) {
  const std::optional<FixedOutput> fod = GetFixedOutput(ToDerivation(drv));
  if (!fod.has_value() || fod->key.empty()) return std::nullopt;
  kiln::v1::CheckFodsRequest request;
  *request.add_fods() = RefOf(ClosureFod{drv_path, *fod, drv.input_srcs});
  kiln::v1::CheckFodsResponse response;
  if (absl::Status s =
          UnaryCall(options_, [&](grpc::ClientContext& c) { return fods_->CheckFods(&c, request, &response); });
      !s.ok() || response.verdicts_size() != 1) {
    // The build goes on; the worker's Nix checks the hash as it builds.
    log(absl::StrCat("kiln: FOD cache unavailable (", s.message(), "); building ", drv_path, " without the check"));
    return std::nullopt;
  }
  const kiln::v1::FodVerdict& verdict = response.verdicts(0);
  if (verdict.kind() == kiln::v1::FodVerdict::KIND_SUSPECT_STALE) {
    log(absl::StrCat("kiln: warning: FOD '", fod->name, "' declares ", fod->declared.Sri(),
                     ", which was computed for other inputs (job ", verdict.stale_source().computed_by_job(),
                     "); it is built, and its hash checked by Nix only if the output is not already valid; ",
                     "`kiln fod-hash` verifies it"));
  }
  if (verdict.kind() != kiln::v1::FodVerdict::KIND_WRONG) return std::nullopt;
  kiln::v1::HashMismatch m;
  m.set_drv_path(drv_path);
  m.set_name(fod->name);
  m.set_specified(fod->declared.Sri());
  m.set_got(verdict.entry().hash());
  m.set_source("cache");
  m.set_computed_by_job(verdict.entry().computed_by_job());
  m.set_computed_by_worker(verdict.entry().computed_by_worker());
  log(absl::StrCat("kiln: FOD '", m.name(), "' declares ", m.specified(), "; its inputs produce ", m.got(),
                   " (known from the FOD cache: not built)"));
  ServeBuildResult failed;
  // What Nix answers when a built output's hash is not the declared one.
  failed.status = ServeBuildStatus::kOutputRejected;
  failed.error_msg = DescribeMismatch(
      m, absl::FormatTime("%Y-%m-%d %H:%M UTC", FromProtoTime(verdict.entry().first_computed()), absl::UTCTimeZone()));
  failed.start_time = failed.stop_time = static_cast<uint64_t>(absl::ToUnixSeconds(absl::Now()));
  return failed;
}

absl::StatusOr<ServeBuildResult> FarmDerivationBuilder::Build(const std::string& drv_path, const ServeDerivation& drv,
                                                              const ServeBuildOptions& options,
                                                              absl::FunctionRef<void(absl::string_view line)> log) {
  if (std::optional<ServeBuildResult> wrong = FailFastFod(drv_path, drv, log)) return *std::move(wrong);
  ServeBuildResult result;
  result.start_time = static_cast<uint64_t>(absl::ToUnixSeconds(absl::Now()));
  // One question for the inputs and the outputs.
  std::vector<std::string> asked = drv.input_srcs;
  for (const ServeDerivationOutput& o : drv.outputs) asked.push_back(o.path);
  ASSIGN_OR_RETURN(const std::vector<std::string> absent, farm_.Missing(asked));
  const absl::flat_hash_set<std::string> inputs(drv.input_srcs.begin(), drv.input_srcs.end());
  std::vector<std::string> missing_inputs;
  for (const std::string& p : absent) {
    if (inputs.contains(p)) missing_inputs.push_back(p);
  }
  if (!missing_inputs.empty()) {
    result.status = ServeBuildStatus::kMiscFailure;
    result.error_msg =
        absl::StrCat("the farm store lacks inputs of ", drv_path, ": ", absl::StrJoin(missing_inputs, ", "));
    result.stop_time = result.start_time;
    return result;
  }
  std::vector<std::pair<std::string, std::string>> named_outputs;
  for (const ServeDerivationOutput& o : drv.outputs) named_outputs.emplace_back(o.name, o.path);
  // Outputs the farm holds already (another client's build, a worker's):
  // built, with no job. Otherwise a job that builds even if the result
  // cache remembers one — its outputs may have been collected since.
  if (absent.empty()) {
    log(absl::StrCat("kiln: the farm store has the outputs of ", drv_path));
    result.status = ServeBuildStatus::kAlreadyValid;
    result.stop_time = result.start_time;
    result.built_outputs = ServeBuiltOutputs(named_outputs);
    return result;
  }
  kiln::v1::SubmitBuildRequest submit;
  *submit.add_targets()->mutable_spec() = DerivationJobSpec(drv_path, drv, options, options_.priority);
  submit.mutable_targets(0)->mutable_spec()->set_rebuild(true);
  submit.set_submitter(absl::StrCat(Submitter(), " (kiln serve-nix)"));
  kiln::v1::Blob& empty = *submit.add_blobs();
  *empty.mutable_digest() = EmptyTree();
  kiln::v1::SubmitBuildResponse submitted;
  RETURN_IF_ERROR(
      UnaryCall(options_, [&](grpc::ClientContext& c) { return stub_->SubmitBuild(&c, submit, &submitted); }));
  if (submitted.job_ids_size() != 1) return absl::InternalError("the coordinator answered with no job");
  const std::string job_id = submitted.job_ids(0);
  log(absl::StrCat("kiln: ", drv_path, " is job ", job_id));
  // The client waits with nothing to say: its end of stdin closing means it
  // left. Its job is then cancelled, and the watch below ends.
  absl::Mutex watch_mu;
  grpc::ClientContext* watching = nullptr;
  const HangupWatch hangup(hangup_fd_, [&] {
    kiln::v1::CancelJobRequest cancel;
    cancel.set_job_id(job_id);
    kiln::v1::CancelJobResponse cancelled;
    (void)UnaryCall(options_, [&](grpc::ClientContext& c) { return stub_->CancelJob(&c, cancel, &cancelled); });
    absl::MutexLock lock(&watch_mu);
    if (watching != nullptr) watching->TryCancel();
  });
  // Follow the job to its end; a broken stream (a coordinator restart) is
  // resumed from the last event seen, for a bounded time.
  uint64_t next_sequence = 0, incarnation = 0;
  std::optional<kiln::v1::JobEvent::Finished> finished;
  const absl::Duration give_up_after = absl::Minutes(2);
  absl::Time lost_since = absl::InfiniteFuture();
  while (!finished) {
    grpc::ClientContext context;
    kiln::v1::WatchJobRequest request;
    request.set_job_id(job_id);
    request.set_from_sequence(next_sequence);
    request.set_incarnation(incarnation);
    {
      absl::MutexLock lock(&watch_mu);
      watching = &context;
    }
    if (hangup.hung_up()) return absl::CancelledError("the client went away");
    auto reader = stub_->WatchJob(&context, request);
    kiln::v1::JobEvent event;
    while (reader->Read(&event)) {
      next_sequence = event.sequence() + 1;
      incarnation = event.incarnation();
      lost_since = absl::InfiniteFuture();
      if (event.has_log()) {
        for (const kiln::v1::LogLine& line : event.log().lines()) log(line.text());
      } else if (event.has_started()) {
        log(absl::StrCat("kiln: building ", drv_path, " on ", event.started().worker()));
      } else if (event.has_finished()) {
        finished = event.finished();
      }
    }
    const absl::Status s = FromGrpcStatus(reader->Finish());
    {
      absl::MutexLock lock(&watch_mu);
      watching = nullptr;
    }
    if (finished) break;
    if (hangup.hung_up()) return absl::CancelledError(absl::StrCat("the client went away: job ", job_id, " cancelled"));
    if (!s.ok() && !absl::IsUnavailable(s)) return s;
    if (lost_since == absl::InfiniteFuture()) lost_since = absl::Now();
    if (absl::Now() - lost_since > give_up_after) {
      return absl::UnavailableError(absl::StrCat("lost the coordinator while job ", job_id, " ran"));
    }
    absl::SleepFor(absl::Milliseconds(500));
  }
  result.stop_time = static_cast<uint64_t>(absl::ToUnixSeconds(absl::Now()));
  const kiln::v1::BuildResult& built = finished->result();
  switch (built.code()) {
    case kiln::v1::RESULT_CODE_SUCCEEDED: {
      result.status = ServeBuildStatus::kBuilt;
      result.times_built = built.cached() ? 0 : 1;
      result.built_outputs = ServeBuiltOutputs(named_outputs);
      break;
    }
    case kiln::v1::RESULT_CODE_TIMED_OUT:
      result.status = ServeBuildStatus::kTimedOut;
      result.error_msg = built.error_message();
      break;
    case kiln::v1::RESULT_CODE_CANCELLED:
      result.status = ServeBuildStatus::kMiscFailure;
      result.error_msg = absl::StrCat("job ", job_id, " was cancelled");
      break;
    default:
      result.status = ServeBuildStatus::kPermanentFailure;
      result.error_msg =
          built.error_message().empty() ? absl::StrCat("job ", job_id, " failed") : built.error_message();
  }
  return result;
}

}  // namespace kiln
