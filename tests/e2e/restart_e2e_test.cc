// A coordinator killed with SIGKILL loses nothing it accepted: after a
// restart on the same address and state directory the queued job is still
// there, the CLI's watch resumes, and the job builds once a worker joins.
#include <csignal>
#include <regex>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
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
      args = [ "-c" "echo )", marker, R"( > $out" ];
    };
  };
})"));

  // No worker yet: the job waits in the queue while the CLI watches.
  ProcessSupervisor supervisor;
  absl::Mutex mu;
  std::string job_id;
  absl::Notification done;
  ExitInfo exit;
  std::string out;
  auto cli = supervisor.Spawn(farm.KilnSpec({"build", work.Sub("svc")}),
                              [&](absl::string_view line) {
                                std::string l(line);
                                std::smatch sm;
                                if (std::regex_search(l, sm, std::regex("queued as job (\\d+)"))) {
                                  absl::MutexLock lock(&mu);
                                  job_id = sm[1];
                                }
                              },
                              [&](ExitInfo e, std::string o) {
                                exit = e;
                                out = std::move(o);
                                done.Notify();
                              });
  ASSERT_TRUE(cli.ok());
  std::string id;
  for (int i = 0; i < 600 && id.empty(); ++i) {
    {
      absl::MutexLock lock(&mu);
      id = job_id;
    }
    if (id.empty()) absl::SleepFor(absl::Milliseconds(20));
  }
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
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(120))) << "the CLI never finished";
  EXPECT_EQ(exit.exit_code, 0);
  const std::string path(absl::StripTrailingAsciiWhitespace(out));
  ASSERT_TRUE(absl::StartsWith(path, "/nix/store/")) << out;
  EXPECT_EQ(testing::ReadFileOrDie(path), marker + "\n");
}

}  // namespace
}  // namespace kiln
