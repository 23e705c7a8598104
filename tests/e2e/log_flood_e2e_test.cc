// Bulk apart from control: one build floods its log while another build on
// the same worker is cancelled; the cancel reaches that build's process (its
// lines travel on SendLogs, the cancel on the control stream). Real daemons,
// real Nix.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::LocalFarm;
using testing::WriteFileOrDie;

bool Running(const std::string& marker) {
  auto p = RunCommand({.argv = {"pgrep", "-f", marker}, .extra_env = {}, .cwd = ""});
  return p.ok() && p->exit.Success();
}

TEST(LogFloodE2eTest, ACancelReachesItsBuildWhileAnotherFloodsItsLog) {
  LocalFarm farm(/*workers=*/1, /*max_jobs_per_worker=*/2);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string nonce = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  // ~200-byte lines, as fast as the shell writes them, for up to a few
  // minutes (it is cancelled at the end).
  WriteFileOrDie(work.Sub("flood/flake.nix"),
                 testing::ShellFlake("flood", absl::StrCat("i=0; while [ $i -lt 5000000 ]; do echo flood ", nonce,
                                                           " line $i ", std::string(160, 'x'), "; i=$((i+1)); done")));
  const std::string marker = absl::StrCat("kiln-flood-sleeper-", nonce);
  WriteFileOrDie(
      work.Sub("sleeper/flake.nix"),
      testing::ShellFlake("sleeper", absl::StrCat("/bin/sh -c '/bin/sleep 300; : ", marker, "' & echo started; wait")));

  auto flood = farm.Kiln({"build", work.Sub("flood"), "--detach", "--json"});
  ASSERT_TRUE(flood.ok());
  ASSERT_EQ(flood->exit.exit_code, 0) << flood->stderr_data;
  auto json_id = [](const std::string& out) {
    const size_t at = out.find("\"jobId\":\"");
    if (at == std::string::npos) return std::string();
    const size_t start = at + 9;
    return out.substr(start, out.find('"', start) - start);
  };
  const std::string flood_job = json_id(flood->stdout_data);
  ASSERT_FALSE(flood_job.empty()) << flood->stdout_data;

  // The flood is on: the coordinator holds thousands of its lines.
  size_t lines = 0;
  for (int i = 0; i < 600 && lines < 20000; ++i) {
    auto log = farm.Kiln({"log", flood_job});
    ASSERT_TRUE(log.ok());
    lines = static_cast<size_t>(std::count(log->stdout_data.begin(), log->stdout_data.end(), '\n'));
    if (lines < 20000) absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_GE(lines, 20000u) << "the flood never got going";

  auto sleeper = farm.Kiln({"build", work.Sub("sleeper"), "--detach", "--json"});
  ASSERT_TRUE(sleeper.ok());
  ASSERT_EQ(sleeper->exit.exit_code, 0) << sleeper->stderr_data;
  const std::string sleeper_job = json_id(sleeper->stdout_data);
  ASSERT_FALSE(sleeper_job.empty());
  bool running = false;
  for (int i = 0; i < 1200 && !running; ++i) {
    running = Running(marker);
    if (!running) absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(running) << "the sleeper never started";

  const absl::Time cancelled_at = absl::Now();
  auto cancel = farm.Kiln({"cancel", sleeper_job});
  ASSERT_TRUE(cancel.ok());
  EXPECT_EQ(cancel->exit.exit_code, 0) << cancel->stderr_data;
  bool gone = false;
  for (int i = 0; i < 600 && !gone; ++i) {
    gone = !Running(marker);
    if (!gone) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(gone) << "the cancelled build's process still runs 30 s after the cancel, under the flood";
  std::printf("cancel reached the process after %s, with the flood at %zu+ lines\n",
              absl::FormatDuration(absl::Now() - cancelled_at).c_str(), lines);

  // The flood still flows, then ends by cancel too.
  auto more = farm.Kiln({"log", flood_job});
  ASSERT_TRUE(more.ok());
  EXPECT_GT(static_cast<size_t>(std::count(more->stdout_data.begin(), more->stdout_data.end(), '\n')), lines);
  EXPECT_FALSE(absl::StrContains(testing::ReadFileOrDie(farm.LogOf("worker-1")), "has no log call"))
      << "the lines went on the control stream";
  auto stop = farm.Kiln({"cancel", flood_job});
  ASSERT_TRUE(stop.ok());
  EXPECT_EQ(stop->exit.exit_code, 0) << stop->stderr_data;
}

}  // namespace
}  // namespace kiln
