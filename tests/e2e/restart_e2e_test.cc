// A coordinator killed with SIGKILL loses nothing it accepted: after a
// restart on the same address and state directory the queued job is still
// there, the CLI's watch resumes, and the job builds once a worker joins.
#include <csignal>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

TEST(RestartE2eTest, QueuedJobSurvivesCoordinatorKillAndRestart) {
  testing::LocalFarm farm(/*workers=*/0);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string marker = absl::StrCat("survivor-", absl::ToUnixNanos(absl::Now()));
  testing::WriteFileOrDie(work.Sub("svc/flake.nix"), absl::StrCat(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "survivor"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo )",
                                                                  marker, R"( > $out" ];
    };
  };
})"));

  // No worker yet: the job waits in the queue while the CLI watches.
  testing::BackgroundBuild cli(farm, {work.Sub("svc")});
  ASSERT_TRUE(cli.spawn_status().ok()) << cli.spawn_status();
  const std::string id = cli.WaitForJobId(absl::Seconds(30));
  ASSERT_FALSE(id.empty()) << "the job was never accepted";

  farm.KillCoordinator(SIGKILL);
  ASSERT_TRUE(farm.RestartCoordinator().ok());

  auto status = farm.Kiln({"status", id, "--json"});
  ASSERT_TRUE(status.ok());
  ASSERT_EQ(status->exit.exit_code, 0) << status->stderr_data;
  nlohmann::json j = nlohmann::json::parse(status->stdout_data);
  EXPECT_EQ(j["status"], "queued");
  EXPECT_EQ(j["waitingReason"], "no worker is connected");

  ASSERT_TRUE(farm.AddWorker().ok());
  ASSERT_TRUE(cli.WaitDone(absl::Seconds(120))) << "the CLI never finished";
  EXPECT_EQ(cli.exit().exit_code, 0);
  const std::string path(absl::StripTrailingAsciiWhitespace(cli.stdout_data()));
  ASSERT_TRUE(absl::StartsWith(path, "/nix/store/")) << cli.stdout_data();
  EXPECT_EQ(testing::ReadFileOrDie(path), marker + "\n");
}

}  // namespace
}  // namespace kiln
