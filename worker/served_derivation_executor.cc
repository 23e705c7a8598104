#include "worker/served_derivation_executor.h"

#include <signal.h>

#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/hash_mismatch.h"
#include "worker/fod_outcomes.h"
#include "google/protobuf/util/time_util.h"

namespace kiln {
namespace {

// "hello" of /nix/store/HASH-hello.drv, as build logs name derivations.
std::string ShortName(absl::string_view drv_path) {
  absl::string_view base = drv_path.substr(drv_path.rfind('/') + 1);
  base = absl::StripSuffix(base, ".drv");
  return std::string(base.size() > 33 ? base.substr(33) : base);
}

// What the build of a fixed-output derivation says about its hash: the
// declared one verified (built), or the one Nix got (a mismatch, also added
// to `result` with the line that says the fix). Nothing for other
// derivations and other failures.
std::optional<kiln::v1::FodOutcome> FodOutcomeOf(const std::string& drv_path, const ServeDerivation& drv,
                                                 const ServeBuildResult& built, absl::Duration took,
                                                 kiln::v1::BuildResult& result) {
  std::optional<FixedOutput> fod = GetFixedOutput(ToDerivation(drv));
  if (!fod.has_value() || fod->key.empty()) return std::nullopt;
  const ClosureFod closure_fod{drv_path, *fod, drv.input_srcs};
  kiln::v1::FodOutcome outcome;
  *outcome.mutable_fod() = RefOf(closure_fod);
  outcome.set_build_seconds(absl::ToDoubleSeconds(took));
  if (built.status == ServeBuildStatus::kBuilt) {
    outcome.set_got(fod->declared.Sri());
    return outcome;
  }
  for (const HashMismatch& m : ParseHashMismatches(built.error_msg)) {
    if (m.path != drv_path && m.path != fod->output_path) continue;
    outcome.set_got(m.got);
    kiln::v1::HashMismatch& reported = *result.add_hash_mismatches();
    reported.set_drv_path(drv_path);
    reported.set_name(fod->name);
    reported.set_specified(m.specified);
    reported.set_got(m.got);
    reported.set_source("build");
    return outcome;
  }
  return std::nullopt;
}

}  // namespace

ServedDerivationExecutor::~ServedDerivationExecutor() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, run] : running_) {
    run.cancelled = true;
    if (run.pid > 0) ::kill(-run.pid, SIGKILL);
  }
  const auto done = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return active_ == 0; };
  mu_.Await(absl::Condition(&done));
}

absl::StatusOr<BuildExecutor::BuildId> ServedDerivationExecutor::Start(const BuildRequest& request,
                                                                       LineCallback on_line, DoneCallback on_done) {
  if (!request.spec.has_derivation()) return inner_->Start(request, std::move(on_line), std::move(on_done));
  const kiln::v1::DerivationTask task = request.spec.derivation();
  absl::StatusOr<ServeDerivation> drv = DecodeServeDerivation(task.basic_derivation());
  if (!drv.ok()) return drv.status();
  ServeBuildOptions options;
  options.max_silent_time = static_cast<uint64_t>(std::max<int64_t>(0, request.spec.max_silent_time().seconds()));
  options.build_timeout = static_cast<uint64_t>(std::max<int64_t>(0, request.spec.timeout().seconds()));
  options.max_log_size = task.max_log_size();
  ServedDerivationNix nix = nix_();
  BuildId id;
  {
    absl::MutexLock lock(&mu_);
    id = next_++;
    running_[id] = Running{};
    ++active_;
  }
  nix.on_started = [this, id](pid_t pid) {
    absl::MutexLock lock(&mu_);
    Running& run = running_[id];
    run.pid = pid;
    if (run.cancelled) ::kill(-pid, SIGKILL);
  };
  std::thread thread([this, id, task, job_id = request.job_id, drv = *std::move(drv), options, nix = std::move(nix),
                      on_line = std::move(on_line), on_done = std::move(on_done)]() mutable {
    const std::string name = ShortName(task.drv_path());
    const absl::Time start = absl::Now();
    absl::StatusOr<ServeBuildResult> built =
        BuildServedDerivation(nix, task.drv_path(), drv, options, [&](absl::string_view text) {
          kiln::v1::LogLine line;
          line.set_derivation(name);
          line.set_text(std::string(text));
          *line.mutable_time() =
              google::protobuf::util::TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(absl::Now()));
          on_line(std::move(line));
        });
    kiln::v1::BuildResult result;
    result.set_drv_path(task.drv_path());
    *result.mutable_build_duration() =
        google::protobuf::util::TimeUtil::NanosecondsToDuration(absl::ToInt64Nanoseconds(absl::Now() - start));
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      cancelled = running_[id].cancelled;
      running_.erase(id);
    }
    if (cancelled) {
      result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
    } else if (!built.ok()) {
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(std::string(built.status().message()));
    } else if (ServeBuildSucceeded(built->status)) {
      result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
      for (const ServeDerivationOutput& o : drv.outputs) (*result.mutable_outputs())[o.name] = o.path;
    } else {
      result.set_code(built->status == ServeBuildStatus::kTimedOut ? kiln::v1::RESULT_CODE_TIMED_OUT
                                                                   : kiln::v1::RESULT_CODE_BUILD_FAILED);
      result.set_error_message(built->error_msg);
    }
    if (built.ok() && !cancelled && fods_ != nullptr) {
      if (std::optional<kiln::v1::FodOutcome> outcome =
              FodOutcomeOf(task.drv_path(), drv, *built, absl::Now() - start, result)) {
        for (const kiln::v1::HashMismatch& m : result.hash_mismatches()) {
          absl::StrAppend(result.mutable_error_message(), "\n", FixLine(m));
        }
        // The cache learns less; the build's result stands.
        (void)fods_->Record({*outcome}, job_id);
      }
    }
    std::move(on_done)(std::move(result));
    absl::MutexLock lock(&mu_);
    --active_;  // The last touch of `this`.
  });
  thread.detach();
  return id;
}

void ServedDerivationExecutor::Cancel(BuildId id) {
  if (id < kOwnIds) return inner_->Cancel(id);
  absl::MutexLock lock(&mu_);
  auto it = running_.find(id);
  if (it == running_.end()) return;
  it->second.cancelled = true;
  if (it->second.pid > 0) ::kill(-it->second.pid, SIGKILL);
}

}  // namespace kiln
