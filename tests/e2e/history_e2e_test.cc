// Logs and history against a real farm: `kiln log` of a finished job prints
// exactly what the live build showed, also after a coordinator restart (the
// log was stored, compressed, in RocksDB); `kiln log -f` follows a running
// job to its end; the retention limit removes the oldest logs and says so;
// `kiln history` lists buildsets newest first. A job that shared another's
// build (a cached result, or an identical job in flight) shows that log.
#include <csignal>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {
using testing::LocalFarm;
using testing::WriteFileOrDie;

std::string Flake(const std::string& script) { return testing::ShellFlake("chatty", script + "; echo ok > $out"); }

// The log lines of a `kiln build --json` run, from its event stream, as
// `kiln log` prints them.
std::string LiveLog(const std::string& events) {
  std::string out;
  for (absl::string_view line : absl::StrSplit(events, '\n', absl::SkipEmpty())) {
    auto event = nlohmann::json::parse(line, nullptr, false);
    if (!event.is_object() || event.value("event", "") != "log") continue;
    const std::string drv = event["derivation"];
    absl::StrAppend(&out, drv.empty() ? "" : drv + "> ", event["text"].get<std::string>(), "\n");
  }
  return out;
}

TEST(HistoryE2eTest, StoredLogsEqualTheLiveLogAndHistoryListsBuildsets) {
  LocalFarm farm(/*workers=*/1);
  // 4 KiB of compressed logs: the first build's alone is more.
  farm.SetCoordinatorFlags({"--log-retention-kb=4"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string nonce = absl::StrCat(absl::ToUnixNanos(absl::Now()));

  // A: 600 lines of little-repeating text.
  WriteFileOrDie(
      work.Sub("a/flake.nix"),
      Flake(absl::StrCat("i=0; while [ $i -lt 600 ]; do i=$((i+1)); echo line $i ",
                         "$(( (i*7919 + i*i*104729) % 1000003 )) $(( (i*i*i) % 999983 )) ", nonce, "; done")));
  auto a = farm.Kiln({"build", work.Sub("a"), "--json"});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->exit.exit_code, 0) << a->stderr_data;
  const std::string a_id = nlohmann::json::parse(a->stdout_data)[0]["jobId"];
  const std::string live = LiveLog(a->stderr_data);
  ASSERT_THAT(live, ::testing::HasSubstr(absl::StrCat("chatty> line 600 ")));

  auto logged = farm.Kiln({"log", a_id});
  ASSERT_TRUE(logged.ok());
  EXPECT_EQ(logged->exit.exit_code, 0) << logged->stderr_data;
  EXPECT_EQ(logged->stdout_data, live);

  // From RocksDB after a restart: the memory that held it is gone.
  farm.KillCoordinator(SIGTERM);
  ASSERT_TRUE(farm.RestartCoordinator().ok());
  auto restored = farm.Kiln({"log", a_id});
  ASSERT_TRUE(restored.ok());
  EXPECT_EQ(restored->exit.exit_code, 0) << restored->stderr_data;
  EXPECT_EQ(restored->stdout_data, live);
  auto as_json = farm.Kiln({"log", a_id, "--json"});
  ASSERT_TRUE(as_json.ok());
  std::vector<std::string> json_lines = absl::StrSplit(as_json->stdout_data, '\n', absl::SkipEmpty());
  // The build's last line, then what the worker did after it (the farm store upload).
  std::erase_if(json_lines, [](const std::string& l) {
    return absl::StartsWith(nlohmann::json::parse(l)["text"].get<std::string>(), "kiln: ");
  });
  ASSERT_FALSE(json_lines.empty());
  EXPECT_EQ(nlohmann::json::parse(json_lines.back())["text"].get<std::string>().rfind("line 600 ", 0), 0u)
      << json_lines.back();

  // B, followed with -f while it runs.
  WriteFileOrDie(work.Sub("b/flake.nix"),
                 Flake(absl::StrCat("for i in 1 2 3; do echo tick $i ", nonce, "; /bin/sleep 1; done")));
  auto detached = farm.Kiln({"build", work.Sub("b"), "--detach"});
  ASSERT_TRUE(detached.ok());
  ASSERT_EQ(detached->exit.exit_code, 0) << detached->stderr_data;
  const std::string b_id(absl::StripAsciiWhitespace(detached->stdout_data));
  auto followed = farm.Kiln({"log", b_id, "-f"});
  ASSERT_TRUE(followed.ok());
  EXPECT_EQ(followed->exit.exit_code, 0) << followed->stderr_data;
  for (int i = 1; i <= 3; ++i) {
    EXPECT_THAT(followed->stdout_data, ::testing::HasSubstr(absl::StrCat("chatty> tick ", i, " ", nonce)));
  }
  auto b_after = farm.Kiln({"log", b_id});
  ASSERT_TRUE(b_after.ok());
  EXPECT_EQ(b_after->stdout_data, followed->stdout_data);

  // B's log pushed the total past 4 KiB: A's, the oldest, went.
  auto expired = farm.Kiln({"log", a_id});
  ASSERT_TRUE(expired.ok());
  EXPECT_EQ(expired->exit.exit_code, 2);
  EXPECT_THAT(expired->stderr_data, ::testing::HasSubstr("removed by the coordinator's retention limit"));
  auto metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT(*metrics, ::testing::HasSubstr("kiln_job_logs_expired_total 1"));
  auto unknown = farm.Kiln({"log", "999999"});
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ(unknown->exit.exit_code, 2);
  EXPECT_THAT(unknown->stderr_data, ::testing::HasSubstr("no job 999999"));

  // History: B's buildset, then A's.
  auto history = farm.Kiln({"history", "--json"});
  ASSERT_TRUE(history.ok());
  ASSERT_EQ(history->exit.exit_code, 0) << history->stderr_data;
  auto list = nlohmann::json::parse(history->stdout_data);
  ASSERT_EQ(list.size(), 2u) << list.dump();
  EXPECT_EQ(list[0]["installables"][0], work.Sub("b"));
  EXPECT_EQ(list[1]["installables"][0], work.Sub("a"));
  for (const auto& b : list) {
    EXPECT_EQ(b["status"], "succeeded") << b.dump();
    EXPECT_EQ(b["targets"], 1);
    EXPECT_GT(b["durationSeconds"].get<double>(), 0.0);
  }
  EXPECT_GE(list[0]["durationSeconds"].get<double>(), 3.0);  // Three one-second ticks.
  auto table = farm.Kiln({"history", "--limit=1"});
  ASSERT_TRUE(table.ok());
  std::vector<std::string> rows = absl::StrSplit(table->stdout_data, '\n', absl::SkipEmpty());
  ASSERT_EQ(rows.size(), 2u) << table->stdout_data;
  EXPECT_THAT(rows[0], ::testing::StartsWith("BUILDSET"));
  EXPECT_THAT(rows[1], ::testing::HasSubstr(list[0]["buildsetId"].get<std::string>()));
  EXPECT_THAT(rows[1], ::testing::HasSubstr("succeeded"));
}

TEST(HistoryE2eTest, AJobThatSharedAnotherJobsBuildShowsThatJobsLog) {
  LocalFarm farm(/*workers=*/1);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string nonce = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  // A result taken from the result cache: the log of the job that built it.
  WriteFileOrDie(work.Sub("c/flake.nix"), Flake(absl::StrCat("echo built once ", nonce)));
  auto first = farm.Kiln({"build", work.Sub("c"), "--detach"});
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->exit.exit_code, 0) << first->stderr_data;
  const std::string first_id(absl::StripAsciiWhitespace(first->stdout_data));
  auto first_log = farm.Kiln({"log", first_id, "-f"});
  ASSERT_TRUE(first_log.ok());
  ASSERT_THAT(first_log->stdout_data, ::testing::HasSubstr(absl::StrCat("chatty> built once ", nonce)));
  auto cached = farm.Kiln({"build", work.Sub("c"), "--detach"});
  ASSERT_TRUE(cached.ok());
  ASSERT_EQ(cached->exit.exit_code, 0) << cached->stderr_data;
  auto cached_log = farm.Kiln({"log", std::string(absl::StripAsciiWhitespace(cached->stdout_data))});
  ASSERT_TRUE(cached_log.ok());
  EXPECT_EQ(cached_log->exit.exit_code, 0) << cached_log->stderr_data;
  EXPECT_EQ(cached_log->stdout_data, first_log->stdout_data);
  EXPECT_THAT(cached_log->stderr_data, ::testing::HasSubstr(absl::StrCat("shared the build of job ", first_id)));

  // A job that followed an identical one in flight, followed live.
  WriteFileOrDie(work.Sub("d/flake.nix"),
                 Flake(absl::StrCat("for i in 1 2 3; do echo tick $i ", nonce, "; /bin/sleep 1; done")));
  auto leader = farm.Kiln({"build", work.Sub("d"), "--detach"});
  auto follower = farm.Kiln({"build", work.Sub("d"), "--detach"});
  ASSERT_TRUE(leader.ok() && follower.ok());
  const std::string leader_id(absl::StripAsciiWhitespace(leader->stdout_data));
  auto follower_log = farm.Kiln({"log", std::string(absl::StripAsciiWhitespace(follower->stdout_data)), "-f"});
  ASSERT_TRUE(follower_log.ok());
  EXPECT_EQ(follower_log->exit.exit_code, 0) << follower_log->stderr_data;
  EXPECT_THAT(follower_log->stderr_data, ::testing::HasSubstr(absl::StrCat("shared the build of job ", leader_id)));
  EXPECT_THAT(follower_log->stdout_data, ::testing::HasSubstr(absl::StrCat("chatty> tick 3 ", nonce)));
}

}  // namespace
}  // namespace kiln
