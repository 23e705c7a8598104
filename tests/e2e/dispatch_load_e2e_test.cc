// Many simulated workers (kiln-dispatch-bench's fake executor) against a
// real coordinator over loopback: every job of a few thousand is assigned,
// completed and acknowledged exactly once, and the coordinator's counters
// agree. (Speed is measured by bench/run dispatch, not here.)
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/time/clock.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

std::string Field(const std::string& output, const std::string& name) {
  for (absl::string_view line : absl::StrSplit(output, '\n')) {
    if (absl::ConsumePrefix(&line, name + "=")) return std::string(line);
  }
  return "";
}

TEST(DispatchLoadE2eTest, EveryJobCompletesOnceUnderConcurrentLoad) {
  testing::LocalFarm farm(/*workers=*/0);
  ASSERT_TRUE(farm.Start().ok());
  constexpr int kJobs = 3000;
  ProcessSpec spec;
  spec.argv = {testing::BinPath("kiln-dispatch-bench"),
               "--coordinator=" + farm.coordinator_address(),
               "--mode=throughput",
               "--workers=50",
               "--slots=2",
               absl::StrCat("--jobs=", kJobs),
               "--batch=250",
               "--max_time=120s"};
  auto run = RunCommand(spec, "", absl::Minutes(3));
  ASSERT_TRUE(run.ok()) << run.status();
  ASSERT_EQ(run->exit.exit_code, 0) << run->stdout_data << run->stderr_data;
  EXPECT_EQ(Field(run->stdout_data, "completed"), absl::StrCat(kJobs));

  // Gauges refresh at most every 100 ms and at the next tick (1 s).
  absl::StatusOr<std::string> scrape;
  for (int i = 0; i < 60; ++i) {
    scrape = testing::ScrapeMetrics(farm.coordinator_metrics());
    if (scrape.ok() && absl::StrContains(*scrape, "kiln_jobs_running 0")) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(scrape.ok());
  EXPECT_THAT(*scrape, ::testing::HasSubstr(absl::StrCat("kiln_jobs_submitted_total ", kJobs)));
  EXPECT_THAT(*scrape, ::testing::HasSubstr(absl::StrCat("kiln_jobs_finished_total{result=\"succeeded\"} ", kJobs)));
  EXPECT_THAT(*scrape, ::testing::HasSubstr("kiln_jobs_running 0"));
}

// The latency mode sends one-job requests on schedule without waiting for
// answers (gRPC's callback API, many calls in flight): every job still
// completes once and gets a latency.
TEST(DispatchLoadE2eTest, LatencyModeKeepsItsScheduleAndCompletesEveryJob) {
  testing::LocalFarm farm(/*workers=*/0);
  ASSERT_TRUE(farm.Start().ok());
  constexpr int kJobs = 600;
  ProcessSpec spec;
  spec.argv = {testing::BinPath("kiln-dispatch-bench"),
               "--coordinator=" + farm.coordinator_address(),
               "--mode=latency",
               "--workers=20",
               "--slots=2",
               absl::StrCat("--jobs=", kJobs),
               "--rate=1000",
               "--max_time=60s"};
  auto run = RunCommand(spec, "", absl::Minutes(2));
  ASSERT_TRUE(run.ok()) << run.status();
  ASSERT_EQ(run->exit.exit_code, 0) << run->stdout_data << run->stderr_data;
  EXPECT_EQ(Field(run->stdout_data, "completed"), absl::StrCat(kJobs));
  int64_t p50 = -1;
  ASSERT_TRUE(absl::SimpleAtoi(Field(run->stdout_data, "assign_latency_p50_us"), &p50));
  EXPECT_GT(p50, 0);
}

// kiln-dispatch-floor (the stand-in coordinator bench/run dispatch measures
// the transport's ceiling with) serves the same load generator: every job
// completes once, and its two placements give the message shapes they are
// named for.
TEST(DispatchLoadE2eTest, TheFloorStandInCompletesEveryJobInBothPlacements) {
  testing::TempDir dir;
  double per_message[2] = {0, 0};
  const char* placements[2] = {"pack", "spread"};
  for (int p = 0; p < 2; ++p) {
    const std::string ready = dir.Sub(absl::StrCat(placements[p], ".ready"));
    const std::string log = dir.Sub(absl::StrCat(placements[p], ".log"));
    auto floor = testing::Daemon::Start({testing::BinPath("kiln-dispatch-floor"), "--listen=127.0.0.1:0",
                                         absl::StrCat("--placement=", placements[p]), "--ready_file=" + ready},
                                        log, {});
    ASSERT_TRUE(floor.ok()) << floor.status();
    auto serving = testing::WaitForReadyFile(ready, log);
    ASSERT_TRUE(serving.ok()) << serving.status();
    const std::string address = (*serving)["grpc"];
    constexpr int kJobs = 2000;
    ProcessSpec spec;
    spec.argv = {testing::BinPath("kiln-dispatch-bench"),
                 "--coordinator=" + address,
                 "--mode=throughput",
                 "--workers=50",
                 "--slots=4",
                 absl::StrCat("--jobs=", kJobs),
                 "--batch=20",
                 "--max_time=120s"};
    auto run = RunCommand(spec, "", absl::Minutes(3));
    ASSERT_TRUE(run.ok()) << run.status();
    ASSERT_EQ(run->exit.exit_code, 0) << run->stdout_data << run->stderr_data;
    EXPECT_EQ(Field(run->stdout_data, "completed"), absl::StrCat(kJobs)) << placements[p];
    ASSERT_TRUE(absl::SimpleAtod(Field(run->stdout_data, "assignments_per_message"), &per_message[p]));
  }
  // pack fills a worker's four free slots at once; spread scatters a round
  // of 20 over 50 workers (~1.2 per message).
  EXPECT_GE(per_message[0], 3.0);
  EXPECT_LT(per_message[1], 2.0);
}

}  // namespace
}  // namespace kiln
