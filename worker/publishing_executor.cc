#include "worker/publishing_executor.h"

#include "absl/strings/str_cat.h"

namespace kiln {

void PublishingExecutor::AfterSuccess(const BuildRequest& request, kiln::v1::BuildResult& result,
                                      absl::FunctionRef<void(absl::string_view)> say) {
  const auto fail = [&](absl::string_view why) {
    result.set_code(kiln::v1::RESULT_CODE_PUSH_FAILED);
    result.set_error_message(absl::StrCat("built, but not pushed: ", why));
    say(result.error_message());
  };
  if (publisher_ == nullptr) return fail("this worker has no registry configuration");
  auto out = result.outputs().find("out");
  if (out == result.outputs().end()) return fail("the build has no output named 'out' to push");
  absl::StatusOr<kiln::v1::PushResult> pushed = publisher_->Publish(request.spec.push(), out->second, say);
  if (!pushed.ok()) return fail(pushed.status().message());
  result.set_pushed_manifest_digest(pushed->manifest_digest());
  *result.mutable_push() = *std::move(pushed);
}

}  // namespace kiln
