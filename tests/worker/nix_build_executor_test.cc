// The rule that shares a worker's derivation slots and cores among its
// builds, and where it lands on Nix's command line; the steps the layers
// above ask for, each run with real Nix (a one-derivation flake). (Whole
// jobs are tested with real Nix in tests/e2e/worker_nix_e2e_test.cc.)
#include "worker/nix_build_executor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

TEST(NixMaxJobsGrantTest, ABuildAloneGetsEverySlotAndBuildsStartedTogetherShare) {
  EXPECT_EQ(NixMaxJobsGrant(/*max_jobs=*/4, /*granted=*/0, /*waiting=*/1), 4);
  EXPECT_EQ(NixMaxJobsGrant(4, 0, 2), 2);
  EXPECT_EQ(NixMaxJobsGrant(4, 0, 4), 1);
  EXPECT_EQ(NixMaxJobsGrant(8, 0, 3), 2);
  EXPECT_EQ(NixMaxJobsGrant(4, 2, 1), 2);  // What the running builds left.
  // Never 0: a build started while every slot is granted still builds.
  EXPECT_EQ(NixMaxJobsGrant(4, 4, 1), 1);
  EXPECT_EQ(NixMaxJobsGrant(4, 7, 3), 1);
  EXPECT_EQ(NixMaxJobsGrant(1, 0, 0), 1);
}

TEST(NixMaxJobsGrantTest, DefaultCoresShareTheCpusAmongTheSlots) {
  EXPECT_EQ(DefaultCoresPerDerivation(16, 4), 4);
  EXPECT_EQ(DefaultCoresPerDerivation(16, 3), 5);
  EXPECT_EQ(DefaultCoresPerDerivation(2, 4), 1);
  EXPECT_EQ(DefaultCoresPerDerivation(8, 0), 8);
}

TEST(NixMaxJobsGrantTest, TheGrantAndCoresComeBeforeTheOperatorsOptions) {
  NixOptions options;
  options.max_jobs = 4;
  options.cores = 3;
  options.options = {{"max-jobs", "2"}};
  NixBuildExecutor executor(options);
  BuildRequest request;
  request.flake_dir = "/src";
  request.attr = "default";
  const std::vector<std::string> argv = executor.BuildArgv(request, 4);
  auto at = [&](const std::string& arg) { return std::find(argv.begin(), argv.end(), arg) - argv.begin(); };
  ASSERT_LT(at("--max-jobs"), static_cast<long>(argv.size()));
  EXPECT_EQ(argv[at("--max-jobs") + 1], "4");
  EXPECT_EQ(argv[at("--cores") + 1], "3");
  EXPECT_LT(at("--cores"), at("--option"));  // An operator's --nix-option=max-jobs=2 wins.
  EXPECT_EQ(argv.back(), "path:/src#default");
  // Without a grant (a command that builds nothing) neither is given.
  const std::vector<std::string> plain = executor.BuildArgv(request);
  EXPECT_EQ(std::find(plain.begin(), plain.end(), "--max-jobs"), plain.end());
  EXPECT_EQ(std::find(plain.begin(), plain.end(), "--cores"), plain.end());
}

TEST(NixBuildExecutorTest, DerivationPrintedTakesOnlyAPlainDrvPath) {
  EXPECT_EQ(*NixBuildExecutor::DerivationPrinted("/nix/store/abc-x.drv\n"), "/nix/store/abc-x.drv");
  EXPECT_FALSE(NixBuildExecutor::DerivationPrinted("").ok());
  EXPECT_FALSE(NixBuildExecutor::DerivationPrinted("/nix/store/abc-x\n").ok());
  // It becomes part of a Nix expression: nothing that could end the path.
  EXPECT_FALSE(NixBuildExecutor::DerivationPrinted("/nix/store/a\"; builtins.abort \"x.drv").ok());
}

// The steps with real Nix on a flake of one derivation that is new to the
// store (a nonce in its name), each step's result and report.
class NixBuildExecutorStepsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    name_ = absl::StrCat("step-", absl::ToUnixNanos(absl::Now()));
    std::ofstream(dir_.Sub("flake.nix")) << testing::ShellFlake(name_, "echo built > $out");
    options_.options = {{"substituters", ""}};
    options_.scratch_dir = dir_.path();
  }

  struct Outcome {
    kiln::v1::BuildResult result;
    absl::Notification done;
  };

  BuildRequest Request(BuildRequest::Step step) {
    BuildRequest request;
    request.flake_dir = dir_.path();
    request.attr = "default";
    request.step = step;
    request.report = std::make_shared<NixRunReport>();
    return request;
  }

  BuildExecutor::BuildId Start(NixBuildExecutor& executor, const BuildRequest& request, Outcome& out) {
    absl::StatusOr<BuildExecutor::BuildId> id = executor.Start(
        request, [](kiln::v1::LogLine) {},
        [&out](kiln::v1::BuildResult result) {
          out.result = std::move(result);
          out.done.Notify();
        });
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }

  kiln::v1::BuildResult Run(NixBuildExecutor& executor, const BuildRequest& request) {
    Outcome out;
    Start(executor, request, out);
    EXPECT_TRUE(out.done.WaitForNotificationWithTimeout(absl::Seconds(120)));
    return out.result;
  }

  testing::TempDir dir_;
  std::string name_;
  NixOptions options_;
};

TEST_F(NixBuildExecutorStepsTest, EvaluateThenBuildThenRebuildTheDerivation) {
  NixBuildExecutor executor(options_);
  const kiln::v1::BuildResult eval = Run(executor, Request(BuildRequest::Step::kEvaluate));
  ASSERT_EQ(eval.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << eval.error_message();
  ASSERT_TRUE(absl::EndsWith(eval.drv_path(), absl::StrCat(name_, ".drv"))) << eval.drv_path();
  EXPECT_TRUE(eval.outputs().empty());  // Evaluated, not built.

  BuildRequest build = Request(BuildRequest::Step::kDerivations);
  build.drv_paths = {eval.drv_path()};
  const kiln::v1::BuildResult built = Run(executor, build);
  ASSERT_EQ(built.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << built.error_message();
  ASSERT_EQ(build.report->built.size(), 1u);
  EXPECT_EQ(build.report->built[0].drv_path, eval.drv_path());

  // Held now: a plain build builds nothing, --rebuild builds it again.
  BuildRequest again = Request(BuildRequest::Step::kDerivations);
  again.drv_paths = {eval.drv_path()};
  ASSERT_EQ(Run(executor, again).code(), kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_TRUE(again.report->built.empty());
  BuildRequest rebuild = again;
  rebuild.rebuild = true;
  rebuild.report = std::make_shared<NixRunReport>();
  ASSERT_EQ(Run(executor, rebuild).code(), kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(rebuild.report->built.size(), 1u);
}

TEST_F(NixBuildExecutorStepsTest, AHandedOverBuildWaitsAndBuildsTheDerivationGiven) {
  NixBuildExecutor executor(options_);
  const kiln::v1::BuildResult eval = Run(executor, Request(BuildRequest::Step::kEvaluate));
  ASSERT_EQ(eval.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << eval.error_message();
  BuildRequest request = Request(BuildRequest::Step::kFlakeAttr);
  request.hand_over = std::make_shared<DerivationHandOver>();
  request.keep_going = true;
  Outcome out;
  Start(executor, request, out);
  EXPECT_FALSE(out.done.WaitForNotificationWithTimeout(absl::Milliseconds(300)));  // Waiting.
  request.hand_over->Give(eval.drv_path());
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(absl::Seconds(120)));
  ASSERT_EQ(out.result.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << out.result.error_message();
  EXPECT_EQ(out.result.drv_path(), eval.drv_path());
  ASSERT_EQ(out.result.outputs().count("out"), 1u);
  EXPECT_TRUE(absl::EndsWith(out.result.outputs().at("out"), name_));
}

TEST_F(NixBuildExecutorStepsTest, AWithdrawnHandOverEndsTheBuildCancelledWithNothingBuilt) {
  NixBuildExecutor executor(options_);
  BuildRequest request = Request(BuildRequest::Step::kFlakeAttr);
  request.hand_over = std::make_shared<DerivationHandOver>();
  Outcome out;
  Start(executor, request, out);
  request.hand_over->Withdraw();
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_CANCELLED);
  EXPECT_EQ(out.result.error_message(), "no derivation was handed over");
  EXPECT_TRUE(request.report->built.empty());
}

TEST_F(NixBuildExecutorStepsTest, ACancelWhileWaitingForTheHandOverEndsTheBuild) {
  NixBuildExecutor executor(options_);
  BuildRequest request = Request(BuildRequest::Step::kFlakeAttr);
  request.hand_over = std::make_shared<DerivationHandOver>();
  Outcome out;
  const BuildExecutor::BuildId id = Start(executor, request, out);
  EXPECT_FALSE(out.done.WaitForNotificationWithTimeout(absl::Milliseconds(100)));
  executor.Cancel(id);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_CANCELLED);
  EXPECT_EQ(out.result.error_message(), "build cancelled");
  EXPECT_FALSE(request.hand_over->Await().has_value());  // Withdrawn by the cancel.
}

TEST_F(NixBuildExecutorStepsTest, BuildingSomethingThatIsNotADerivationIsRefused) {
  NixBuildExecutor executor(options_);
  BuildRequest request = Request(BuildRequest::Step::kDerivations);
  request.drv_paths = {"--option"};
  Outcome out;
  EXPECT_FALSE(executor
                   .Start(
                       request, [](kiln::v1::LogLine) {}, [](kiln::v1::BuildResult) {})
                   .ok());
}

}  // namespace
}  // namespace kiln
