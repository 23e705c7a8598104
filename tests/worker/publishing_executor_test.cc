// PublishingExecutor over fakes at its two seams: a fake inner executor
// whose builds end when the test says, and a fake publisher.
#include "worker/publishing_executor.h"

#include <gtest/gtest.h>

#include <thread>

#include "absl/synchronization/notification.h"

namespace kiln {
namespace {

// A fake BuildExecutor: records starts and cancels; Finish() ends a build
// on a thread of its own, as the real one does.
class FakeInnerExecutor final : public BuildExecutor {
 public:
  ~FakeInnerExecutor() override {
    for (std::thread& t : threads_) t.join();
  }
  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override {
    const BuildId id = next_++;
    builds_[id] = {std::move(on_line), std::move(on_done)};
    return id;
  }
  void Cancel(BuildId id) override { cancelled.push_back(id); }
  void Finish(BuildId id, kiln::v1::BuildResult result) {
    threads_.emplace_back([this, id, result] {
      kiln::v1::LogLine line;
      line.set_text("building");
      builds_[id].on_line(std::move(line));
      std::move(builds_[id].on_done)(result);
    });
  }
  void Join() {
    for (std::thread& t : threads_) t.join();
    threads_.clear();
  }
  std::vector<BuildId> cancelled;

 private:
  struct Build {
    LineCallback on_line;
    DoneCallback on_done;
  };
  std::map<BuildId, Build> builds_;
  std::vector<std::thread> threads_;
  BuildId next_ = 1;
};

// A fake ImagePublisher: answers `answer`, after `release` when set.
class FakePublisher final : public ImagePublisher {
 public:
  absl::StatusOr<kiln::v1::PushResult> Publish(const kiln::v1::PushTarget& push, const std::string& output,
                                               absl::FunctionRef<void(absl::string_view)> log) override {
    pushed_output = output;
    pushed_repository = push.repository();
    log("pushing");
    publishing.Notify();
    if (release != nullptr) release->WaitForNotification();
    return answer;
  }
  absl::StatusOr<kiln::v1::PushResult> answer;
  std::string pushed_output, pushed_repository;
  absl::Notification publishing;
  absl::Notification* release = nullptr;
};

struct Outcome {
  std::vector<std::string> lines;
  kiln::v1::BuildResult result;
  absl::Notification done;
};

BuildRequest WithPush() {
  BuildRequest request;
  request.spec.mutable_push()->set_repository("127.0.0.1:5000/kiln/app");
  request.spec.mutable_push()->add_tags("testing");
  return request;
}

kiln::v1::BuildResult Built() {
  kiln::v1::BuildResult result;
  result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  (*result.mutable_outputs())["out"] = "/nix/store/abc-image.tar.gz";
  return result;
}

BuildExecutor::BuildId StartInto(BuildExecutor& executor, const BuildRequest& request, Outcome& out) {
  absl::StatusOr<BuildExecutor::BuildId> id = executor.Start(
      request, [&out](kiln::v1::LogLine line) { out.lines.push_back(line.text()); },
      [&out](kiln::v1::BuildResult result) {
        out.result = std::move(result);
        out.done.Notify();
      });
  EXPECT_TRUE(id.ok());
  return *id;
}

TEST(PublishingExecutor, ABuildWithoutPushTargetPassesThrough) {
  FakeInnerExecutor inner;
  FakePublisher publisher;
  PublishingExecutor executor(&inner, &publisher);
  Outcome out;
  const auto id = StartInto(executor, BuildRequest(), out);
  inner.Finish(id, Built());
  out.done.WaitForNotification();
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_FALSE(publisher.publishing.HasBeenNotified());
}

TEST(PublishingExecutor, ASuccessfulBuildIsPushedAndItsManifestReported) {
  FakeInnerExecutor inner;
  FakePublisher publisher;
  kiln::v1::PushResult pushed;
  pushed.set_manifest_digest("sha256:feed");
  publisher.answer = pushed;
  PublishingExecutor executor(&inner, &publisher);
  Outcome out;
  const auto id = StartInto(executor, WithPush(), out);
  inner.Finish(id, Built());
  out.done.WaitForNotification();
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(out.result.pushed_manifest_digest(), "sha256:feed");
  EXPECT_EQ(out.result.push().manifest_digest(), "sha256:feed");
  EXPECT_EQ(publisher.pushed_output, "/nix/store/abc-image.tar.gz");
  EXPECT_EQ(publisher.pushed_repository, "127.0.0.1:5000/kiln/app");
  EXPECT_EQ(out.lines, (std::vector<std::string>{"building", "kiln: pushing"}));
}

TEST(PublishingExecutor, AFailedBuildIsNotPushed) {
  FakeInnerExecutor inner;
  FakePublisher publisher;
  PublishingExecutor executor(&inner, &publisher);
  Outcome out;
  const auto id = StartInto(executor, WithPush(), out);
  kiln::v1::BuildResult failed;
  failed.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  inner.Finish(id, failed);
  out.done.WaitForNotification();
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_BUILD_FAILED);
  EXPECT_FALSE(publisher.publishing.HasBeenNotified());
}

TEST(PublishingExecutor, APushThatCannotHappenFailsTheJobSayingWhy) {
  FakeInnerExecutor inner;
  PublishingExecutor without_registry(&inner, nullptr);
  Outcome out;
  inner.Finish(StartInto(without_registry, WithPush(), out), Built());
  out.done.WaitForNotification();
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_PUSH_FAILED);
  EXPECT_EQ(out.result.error_message(), "built, but not pushed: this worker has no registry configuration");
  EXPECT_EQ(out.lines.back(), "kiln: " + out.result.error_message());

  FakePublisher refusing;
  refusing.answer = absl::PermissionDeniedError("registry said 401");
  PublishingExecutor executor(&inner, &refusing);
  Outcome refused;
  inner.Finish(StartInto(executor, WithPush(), refused), Built());
  refused.done.WaitForNotification();
  EXPECT_EQ(refused.result.code(), kiln::v1::RESULT_CODE_PUSH_FAILED);
  EXPECT_EQ(refused.result.error_message(), "built, but not pushed: registry said 401");

  Outcome no_out;
  kiln::v1::BuildResult other_output = Built();
  other_output.mutable_outputs()->clear();
  (*other_output.mutable_outputs())["bin"] = "/nix/store/x";
  inner.Finish(StartInto(executor, WithPush(), no_out), other_output);
  no_out.done.WaitForNotification();
  EXPECT_EQ(no_out.result.error_message(), "built, but not pushed: the build has no output named 'out' to push");
}

TEST(PublishingExecutor, ACancelDuringThePushEndsTheJobCancelled) {
  FakeInnerExecutor inner;
  FakePublisher publisher;
  absl::Notification release;
  publisher.release = &release;
  publisher.answer = kiln::v1::PushResult();
  PublishingExecutor executor(&inner, &publisher);
  Outcome out;
  const auto id = StartInto(executor, WithPush(), out);
  inner.Finish(id, Built());
  publisher.publishing.WaitForNotification();
  executor.Cancel(id);
  EXPECT_EQ(inner.cancelled, std::vector<BuildExecutor::BuildId>{id}) << "the cancel reaches the build too";
  release.Notify();
  out.done.WaitForNotification();
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_CANCELLED);
  inner.Join();
  // Its bookkeeping is gone: a later cancel of the same id changes nothing here.
  executor.Cancel(id);
}

}  // namespace
}  // namespace kiln
