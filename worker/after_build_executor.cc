#include "worker/after_build_executor.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"

namespace kiln {

absl::StatusOr<BuildExecutor::BuildId> AfterBuildExecutor::Start(const BuildRequest& request, LineCallback on_line,
                                                                 DoneCallback on_done) {
  if (!Applies(request)) return inner_->Start(request, std::move(on_line), std::move(on_done));
  // The inner build and the work after it both write lines: they share the
  // callback. The inner executor reports no line after its result.
  auto lines = std::make_shared<LineCallback>(std::move(on_line));
  auto state = std::make_shared<After>();
  absl::StatusOr<BuildId> started = inner_->Start(
      request, [lines](kiln::v1::LogLine line) { (*lines)(std::move(line)); },
      [this, lines, state, request, done = std::move(on_done)](kiln::v1::BuildResult result) mutable {
        if (result.code() == kiln::v1::RESULT_CODE_SUCCEEDED) {
          const absl::Time start = absl::Now();
          AfterSuccess(request, result, [&](absl::string_view text) {
            kiln::v1::LogLine line;
            line.set_text(absl::StrCat("kiln: ", text));
            *line.mutable_time() = ToProtoTime(absl::Now());
            (*lines)(std::move(line));
          });
          *result.mutable_build_duration() =
              ToProtoDuration(FromProtoDuration(result.build_duration()) + (absl::Now() - start));
        }
        bool cancelled;
        {
          absl::MutexLock lock(&mu_);
          state->done = true;
          cancelled = state->cancelled;
          // A few builds are in this layer at once at most: a scan finds this one.
          for (auto it = after_.begin(); it != after_.end(); ++it) {
            if (it->second == state) {
              after_.erase(it);
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
  if (!state->done) after_[*started] = std::move(state);
  return started;
}

void AfterBuildExecutor::Cancel(BuildId id) {
  {
    absl::MutexLock lock(&mu_);
    if (auto it = after_.find(id); it != after_.end()) it->second->cancelled = true;
  }
  inner_->Cancel(id);
}

}  // namespace kiln
