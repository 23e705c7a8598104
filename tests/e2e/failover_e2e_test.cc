// A buildset of real Nix jobs on three real workers survives losing a worker
// (kill -9: its jobs come back after the lease and run elsewhere) and losing
// the coordinator (kill -9 and restart: the workers keep building, re-attach
// their jobs, and no job runs twice). Every job ends exactly once, with the
// output it should have.
#include <csignal>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

constexpr int kJobs = 12;

// A flake with jobs job1…jobN, each taking `seconds` and writing its marker.
std::vector<std::string> WriteSlowFlake(const testing::TempDir& work, const std::string& marker, int seconds) {
  std::string attrs;
  for (int i = 1; i <= kJobs; ++i) {
    absl::StrAppend(&attrs, "    packages.x86_64-linux.job", i, " = derivation {\n", "      name = \"slow-", i,
                    "\"; system = \"x86_64-linux\"; builder = \"/bin/sh\";\n", "      args = [ \"-c\" \"/bin/sleep ",
                    seconds, "; echo ", marker, "-", i, " > $out\" ];\n    };\n");
  }
  testing::WriteFileOrDie(work.Sub("svc/flake.nix"), absl::StrCat("{\n  outputs = { self }: {\n", attrs, "  };\n}\n"));
  std::vector<std::string> args = {"--json", "--quiet"};
  for (int i = 1; i <= kJobs; ++i) args.push_back(absl::StrCat(work.Sub("svc"), "#job", i));
  return args;
}

// Sum of a metric's samples in a scrape (0 when absent).
double MetricSum(const std::string& scrape, const std::string& name) {
  double sum = 0;
  for (absl::string_view line : absl::StrSplit(scrape, '\n')) {
    if (!absl::StartsWith(line, name) || line.size() <= name.size()) continue;
    if (line[name.size()] != ' ' && line[name.size()] != '{') continue;
    double v = 0;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) sum += v;
  }
  return sum;
}

// Waits (bounded) until worker `index` runs at least one build.
bool WaitForBuilding(const testing::LocalFarm& farm, size_t index) {
  for (int i = 0; i < 600; ++i) {
    auto scrape = testing::ScrapeMetrics(farm.worker_metrics()[index]);
    if (scrape.ok() && MetricSum(*scrape, "kiln_worker_builds_running") >= 1) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

// Waits (bounded) until the coordinator has accepted `jobs` jobs.
bool WaitForSubmitted(const testing::LocalFarm& farm, int jobs) {
  for (int i = 0; i < 600; ++i) {
    auto scrape = testing::ScrapeMetrics(farm.coordinator_metrics());
    if (scrape.ok() && MetricSum(*scrape, "kiln_jobs_submitted_total") >= jobs) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

// Checks the CLI's JSON: every job once, succeeded, with its own output (in
// the store of the worker that built it).
void ExpectEveryJobOnce(const testing::LocalFarm& farm, const testing::BackgroundBuild& cli,
                        const std::string& marker) {
  ASSERT_EQ(cli.exit().exit_code, 0) << cli.stdout_data();
  nlohmann::json results = nlohmann::json::parse(cli.stdout_data());
  ASSERT_EQ(results.size(), static_cast<size_t>(kJobs));
  std::set<std::string> ids;
  for (int i = 0; i < kJobs; ++i) {
    const auto& r = results[i];
    EXPECT_EQ(r["status"], "succeeded") << r.dump();
    ids.insert(r["jobId"].get<std::string>());
    const std::string out = r["outputs"]["out"];
    EXPECT_EQ(testing::ReadFileOrDie(farm.HostPathOf(out)), absl::StrCat(marker, "-", i + 1, "\n")) << r.dump();
  }
  EXPECT_EQ(ids.size(), static_cast<size_t>(kJobs));
}

nlohmann::json Status(const testing::LocalFarm& farm, const std::string& id) {
  auto status = farm.Kiln({"status", id, "--json"});
  if (!status.ok() || status->exit.exit_code != 0) return nlohmann::json::object();
  return nlohmann::json::parse(status->stdout_data);
}

// The processes whose command line names `path` (a worker's directory),
// but for worker daemons: pid → command line.
std::map<int, std::string> ProcessesNaming(const std::string& path) {
  std::map<int, std::string> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    int pid = 0;
    if (!absl::SimpleAtoi(entry.path().filename().string(), &pid)) continue;
    std::ifstream in(entry.path() / "cmdline", std::ios::binary);
    std::string cmdline((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
    if (absl::StrContains(cmdline, path) && !absl::StrContains(cmdline, "kiln-worker")) found[pid] = cmdline;
  }
  return found;
}

TEST(FailoverE2eTest, AWorkerStartedAfterACrashStopsTheBuildsItsLastRunLeft) {
  testing::LocalFarm farm(/*workers=*/1);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string marker = absl::StrCat("leftover-", absl::ToUnixNanos(absl::Now()));
  // Builds that outlast the test: nothing ends by itself meanwhile.
  testing::BackgroundBuild cli(farm, WriteSlowFlake(work, marker, 600));
  ASSERT_TRUE(cli.spawn_status().ok());
  // Until Nix runs (a build counts as running from its assignment on).
  const std::string dir = farm.dir().Sub("worker-1/");
  for (int i = 0; i < 600 && ProcessesNaming(dir).empty(); ++i) absl::SleepFor(absl::Milliseconds(50));

  farm.KillWorker(0, SIGKILL);
  const std::map<int, std::string> left = ProcessesNaming(dir);
  EXPECT_FALSE(left.empty()) << "no build outlived its worker";
  ASSERT_TRUE(farm.RestartWorker(0).ok());
  // Stopped before the new run was ready. (The new run's own builds name
  // the directory too: only the old processes count.)
  const std::map<int, std::string> now = ProcessesNaming(dir);
  for (const auto& [pid, cmdline] : left) {
    auto it = now.find(pid);
    EXPECT_TRUE(it == now.end() || it->second != cmdline) << "still running: " << pid << ": " << cmdline;
  }
  EXPECT_THAT(testing::ReadFileOrDie(farm.LogOf("worker-1")), ::testing::HasSubstr("left running by a previous run"));
}

TEST(FailoverE2eTest, JobsOfAKilledWorkerRunElsewhereAfterTheLease) {
  testing::LocalFarm farm(/*workers=*/3);
  farm.SetCoordinatorFlags({"--lease=2s"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string marker = absl::StrCat("worker-kill-", absl::ToUnixNanos(absl::Now()));
  testing::BackgroundBuild cli(farm, WriteSlowFlake(work, marker, 2));
  ASSERT_TRUE(cli.spawn_status().ok());
  ASSERT_TRUE(WaitForBuilding(farm, 0)) << "worker-1 never started a build";

  farm.KillWorker(0, SIGKILL);
  ASSERT_TRUE(cli.WaitDone(absl::Seconds(240))) << "the buildset never finished";
  ExpectEveryJobOnce(farm, cli, marker);

  // What ran on worker-1 ran again elsewhere, as a second attempt.
  nlohmann::json results = nlohmann::json::parse(cli.stdout_data());
  int second_attempts = 0;
  for (const auto& r : results) {
    nlohmann::json s = Status(farm, r["jobId"]);
    EXPECT_NE(s["worker"], "worker-1") << s.dump();
    second_attempts += s["attempt"] == 2 ? 1 : 0;
  }
  EXPECT_GE(second_attempts, 1);
  auto scrape = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(scrape.ok());
  EXPECT_GE(MetricSum(*scrape, "kiln_job_requeues_total"), 1);
}

TEST(FailoverE2eTest, WorkersKeepBuildingThroughACoordinatorKillAndReattach) {
  testing::LocalFarm farm(/*workers=*/3);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string marker = absl::StrCat("coordinator-kill-", absl::ToUnixNanos(absl::Now()));
  testing::BackgroundBuild cli(farm, WriteSlowFlake(work, marker, 2));
  ASSERT_TRUE(cli.spawn_status().ok());
  ASSERT_TRUE(WaitForSubmitted(farm, kJobs)) << "the CLI never submitted every job";
  ASSERT_TRUE(WaitForBuilding(farm, 0)) << "worker-1 never started a build";

  farm.KillCoordinator(SIGKILL);
  ASSERT_TRUE(farm.RestartCoordinator().ok());
  ASSERT_TRUE(cli.WaitDone(absl::Seconds(240))) << "the buildset never finished";
  ExpectEveryJobOnce(farm, cli, marker);
  // The builds running at the kill were re-attached, not run again: every
  // job finished on its first attempt.
  nlohmann::json results = nlohmann::json::parse(cli.stdout_data());
  for (const auto& r : results) {
    nlohmann::json s = Status(farm, r["jobId"]);
    EXPECT_EQ(s["attempt"], 1) << s.dump();
  }
}

TEST(FailoverE2eTest, ADrainedWorkerTakesNothingNew) {
  testing::LocalFarm farm(/*workers=*/2);
  ASSERT_TRUE(farm.Start().ok());
  auto drain = farm.Kiln({"workers", "drain", "worker-1"});
  ASSERT_TRUE(drain.ok());
  ASSERT_EQ(drain->exit.exit_code, 0) << drain->stderr_data;
  EXPECT_THAT(drain->stdout_data, ::testing::HasSubstr("worker worker-1: draining"));

  testing::TempDir work;
  const std::string marker = absl::StrCat("drain-", absl::ToUnixNanos(absl::Now()));
  std::vector<std::string> args = WriteSlowFlake(work, marker, 0);
  args.insert(args.begin(), "build");
  auto build = farm.Kiln(args);
  ASSERT_TRUE(build.ok());
  ASSERT_EQ(build->exit.exit_code, 0) << build->stderr_data;
  nlohmann::json results = nlohmann::json::parse(build->stdout_data);
  ASSERT_EQ(results.size(), static_cast<size_t>(kJobs));
  for (const auto& r : results) EXPECT_EQ(r["worker"], "worker-2") << r.dump();

  auto workers = farm.Kiln({"workers", "--json"});
  ASSERT_TRUE(workers.ok());
  ASSERT_EQ(workers->exit.exit_code, 0) << workers->stderr_data;
  nlohmann::json list = nlohmann::json::parse(workers->stdout_data);
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0]["name"], "worker-1");
  EXPECT_EQ(list[0]["state"], "draining");
  EXPECT_EQ(list[1]["state"], "connected");
  EXPECT_EQ(list[1]["maxJobs"], 2);
  EXPECT_GT(list[1]["storeFreeBytes"].get<int64_t>(), 0);  // From its heartbeats.
  auto table = farm.Kiln({"workers"});
  ASSERT_TRUE(table.ok());
  EXPECT_THAT(table->stdout_data, ::testing::HasSubstr("NAME"));
  EXPECT_THAT(table->stdout_data, ::testing::HasSubstr("draining"));

  // The whole submission's state in one call, by buildset.
  const std::string buildset = Status(farm, results[0]["jobId"])["buildsetId"];
  auto status = farm.Kiln({"status", buildset, "--json"});
  ASSERT_TRUE(status.ok());
  ASSERT_EQ(status->exit.exit_code, 0) << status->stderr_data;
  nlohmann::json bs = nlohmann::json::parse(status->stdout_data);
  EXPECT_EQ(bs["buildsetId"], buildset);
  EXPECT_GE(bs["jobs"].size(), 1u);
  EXPECT_EQ(bs["counts"]["succeeded"], bs["jobs"].size());

  auto unknown = farm.Kiln({"workers", "drain", "nobody"});
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ(unknown->exit.exit_code, 2);
  EXPECT_THAT(unknown->stderr_data, ::testing::HasSubstr("no worker named 'nobody'"));
}

TEST(FailoverE2eTest, AWorkerShortOfDiskTakesNoJobAndStatusSaysWhy) {
  testing::LocalFarm farm(/*workers=*/1);
  // More free space than any disk has: the worker is always over the limit.
  farm.SetCoordinatorFlags({"--worker-min-store-free-mb=1000000000000"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  std::vector<std::string> args = WriteSlowFlake(work, "disk", 0);
  testing::BackgroundBuild cli(farm, {args[2]});  // Not --quiet: it announces the job id.
  const std::string id = cli.WaitForJobId(absl::Seconds(30));
  ASSERT_FALSE(id.empty());
  std::string reason;
  for (int i = 0; i < 200 && !absl::StrContains(reason, "free on its Nix store"); ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    nlohmann::json s = Status(farm, id);
    reason = s.value("waitingReason", "");
  }
  EXPECT_THAT(reason, ::testing::HasSubstr("all 1 capable workers are over their limits (worker-1: "));
  EXPECT_THAT(reason, ::testing::HasSubstr("free on its Nix store, below"));
  auto cancel = farm.Kiln({"cancel", id});
  ASSERT_TRUE(cancel.ok());
  EXPECT_EQ(cancel->exit.exit_code, 0) << cancel->stderr_data;
  ASSERT_TRUE(cli.WaitDone(absl::Seconds(60)));
  EXPECT_EQ(cli.exit().exit_code, 1);  // Cancelled.
}

}  // namespace
}  // namespace kiln
