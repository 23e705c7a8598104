#include "worker/publishing_executor.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"

namespace kiln {

absl::StatusOr<BuildExecutor::BuildId> PublishingExecutor::Start(const BuildRequest& request, LineCallback on_line,
                                                                 DoneCallback on_done) {
  if (!request.spec.has_push()) return inner_->Start(request, std::move(on_line), std::move(on_done));
  // The inner build and the push both write lines: they share the callback.
  // The inner executor reports no line after its result.
  auto lines = std::make_shared<LineCallback>(std::move(on_line));
  auto state = std::make_shared<Pushing>();
  absl::StatusOr<BuildId> started = inner_->Start(
      request, [lines](kiln::v1::LogLine line) { (*lines)(std::move(line)); },
      [this, lines, state, push = request.spec.push(),
       done = std::move(on_done)](kiln::v1::BuildResult result) mutable {
        if (result.code() == kiln::v1::RESULT_CODE_SUCCEEDED) {
          const absl::Time start = absl::Now();
          Publish(push, result, *lines);
          // The job's duration covers its push, as it did when Nix's
          // executor pushed itself.
          *result.mutable_build_duration() =
              ToProtoDuration(FromProtoDuration(result.build_duration()) + (absl::Now() - start));
        }
        bool cancelled;
        {
          absl::MutexLock lock(&mu_);
          state->done = true;
          cancelled = state->cancelled;
          // A few pushes run at once at most: a scan finds this one.
          for (auto it = pushing_.begin(); it != pushing_.end(); ++it) {
            if (it->second == state) {
              pushing_.erase(it);
              break;
            }
          }
        }
        if (cancelled && result.code() != kiln::v1::RESULT_CODE_CANCELLED) {
          const auto duration = result.build_duration();
          result.Clear();
          result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
          result.set_error_message("build cancelled");
          *result.mutable_build_duration() = duration;
        }
        std::move(done)(std::move(result));
      });
  if (!started.ok()) return started;
  absl::MutexLock lock(&mu_);
  // Unless it ended already (its result went on before Start returned).
  if (!state->done) pushing_[*started] = std::move(state);
  return started;
}

void PublishingExecutor::Cancel(BuildId id) {
  {
    absl::MutexLock lock(&mu_);
    if (auto it = pushing_.find(id); it != pushing_.end()) it->second->cancelled = true;
  }
  inner_->Cancel(id);
}

void PublishingExecutor::Publish(const kiln::v1::PushTarget& push, kiln::v1::BuildResult& result,
                                 LineCallback& on_line) {
  const auto say = [&](absl::string_view text) {
    kiln::v1::LogLine line;
    line.set_text(absl::StrCat("kiln: ", text));
    *line.mutable_time() = ToProtoTime(absl::Now());
    on_line(std::move(line));
  };
  const auto fail = [&](absl::string_view why) {
    result.set_code(kiln::v1::RESULT_CODE_PUSH_FAILED);
    result.set_error_message(absl::StrCat("built, but not pushed: ", why));
    say(result.error_message());
  };
  if (publisher_ == nullptr) return fail("this worker has no registry configuration");
  auto out = result.outputs().find("out");
  if (out == result.outputs().end()) return fail("the build has no output named 'out' to push");
  absl::StatusOr<kiln::v1::PushResult> pushed = publisher_->Publish(push, out->second, say);
  if (!pushed.ok()) return fail(pushed.status().message());
  result.set_pushed_manifest_digest(pushed->manifest_digest());
  *result.mutable_push() = *std::move(pushed);
}

}  // namespace kiln
