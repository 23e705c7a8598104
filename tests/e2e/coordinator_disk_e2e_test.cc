// The coordinator on a filling disk: its state directory on a 30 MiB tmpfs,
// filled up while it runs. Before the disk is full (at its reserve,
// --state-min-free-mb) new work is refused with its own message and exit
// code, /readyz and a metric say why, nothing is reported that was not
// stored, and once space is freed it takes work again by itself, without a
// restart. (Stopping at the reserve is what makes that last part hold:
// RocksDB cannot resume in the running process after a write of its own log
// met a full disk.)
#include <gtest/gtest.h>
#include <sys/statvfs.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::LocalFarm;
using testing::WriteFileOrDie;

// A flake with a 30 KiB file of its own: each submission stores ~30 KiB.
void WriteFlake(const std::string& dir, int n) {
  const std::string marker = absl::StrCat(n, "-", absl::ToUnixNanos(absl::Now()));
  WriteFileOrDie(dir + "/flake.nix", testing::ShellFlake("disk-full", absl::StrCat("echo ", marker, " > $out")));
  std::string data(30 << 10, '\0');
  std::mt19937_64 random(static_cast<uint64_t>(n));
  for (char& c : data) c = static_cast<char>(random());
  WriteFileOrDie(dir + "/data.bin", data);
}

int HttpStatus(const std::string& url) {
  auto r =
      RunCommand({.argv = {"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url}, .extra_env = {}, .cwd = ""});
  int code = 0;
  return r.ok() && absl::SimpleAtoi(r->stdout_data, &code) ? code : 0;
}

TEST(CoordinatorDiskE2eTest, AFullStateDiskRefusesNewWorkAnnouncesNothingUnstoredAndRecoversByItself) {
  LocalFarm farm(/*workers=*/1);
  const std::string state = farm.dir().Sub("coordinator");
  fs::create_directories(state);
  testing::ScopedTmpfs small_disk(state, "30m");
  ASSERT_TRUE(small_disk.status().ok()) << small_disk.status();
  ASSERT_TRUE(farm.Start().ok());
  const std::string readyz = absl::StrCat("http://", farm.coordinator_metrics(), "/readyz");
  ASSERT_EQ(HttpStatus(readyz), 200);

  // Leave about 2 MiB above the reserve (8 MiB): room for some builds.
  struct statvfs fsinfo;
  ASSERT_EQ(::statvfs(state.c_str(), &fsinfo), 0);
  const uint64_t free_bytes = static_cast<uint64_t>(fsinfo.f_bavail) * fsinfo.f_frsize;
  {
    std::ofstream filler(state + "/filler", std::ios::binary);
    const std::string block(1 << 20, 'x');
    for (uint64_t written = 0; written + (10 << 20) <= free_bytes; written += block.size())
      filler.write(block.data(), block.size());
  }

  // Submissions until one is refused (bounded: the 2–3 MiB above the reserve
  // hold fewer than 150 of ~30 KiB).
  testing::TempDir src;
  std::vector<std::string> accepted;
  CommandResult refused;
  for (int i = 0; i < 150 && refused.exit.exit_code <= 0; ++i) {
    const std::string dir = src.Sub(absl::StrCat("s", i));
    WriteFlake(dir, i);
    auto r = farm.Kiln({"build", dir, "--detach", "--json"});
    ASSERT_TRUE(r.ok()) << r.status();
    if (r->exit.exit_code != 0) {
      refused = *r;
      break;
    }
    auto j = nlohmann::json::parse(r->stdout_data, nullptr, false);
    ASSERT_TRUE(j.is_array() && j.size() == 1) << r->stdout_data;
    accepted.push_back(j[0].value("jobId", ""));
  }
  ASSERT_GT(refused.exit.exit_code, 0) << "150 submissions fitted in 3 MiB";
  EXPECT_EQ(refused.exit.exit_code, 4) << refused.stderr_data;
  EXPECT_TRUE(absl::StrContains(refused.stderr_data, "the coordinator is out of disk space")) << refused.stderr_data;
  EXPECT_TRUE(absl::StrContains(refused.stderr_data, "below the reserve of 8 MiB")) << refused.stderr_data;
  EXPECT_FALSE(absl::StrContains(refused.stderr_data, "cannot reach")) << refused.stderr_data;
  // Not ready, and the metric says why.
  EXPECT_EQ(HttpStatus(readyz), 503);
  auto metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(metrics.ok());
  EXPECT_TRUE(absl::StrContains(*metrics, "\nkiln_state_writable 0")) << *metrics;
  // Whatever `kiln status` reports finished now was stored (checked after
  // the restart below).
  std::vector<std::string> reported_done;
  for (const std::string& id : accepted) {
    auto st = farm.Kiln({"status", id, "--json"});
    ASSERT_TRUE(st.ok());
    auto j = nlohmann::json::parse(st->stdout_data, nullptr, false);
    if (j.is_object() && j.value("status", "") == "succeeded") reported_done.push_back(id);
  }

  // Space comes back: it resumes by itself.
  fs::remove(state + "/filler");
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (HttpStatus(readyz) != 200 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(200));
  ASSERT_EQ(HttpStatus(readyz), 200) << testing::ReadFileOrDie(farm.LogOf("coordinator"));
  const std::string after = src.Sub("after");
  WriteFlake(after, 1000);
  auto built = farm.Kiln({"build", after});
  ASSERT_TRUE(built.ok());
  EXPECT_EQ(built->exit.exit_code, 0) << built->stderr_data;
  metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(metrics.ok());
  EXPECT_TRUE(absl::StrContains(*metrics, "\nkiln_state_writable 1")) << *metrics;

  const std::string log = testing::ReadFileOrDie(farm.LogOf("coordinator"));
  EXPECT_TRUE(absl::StrContains(log, "state writes stopped; taking no new work")) << log;
  EXPECT_FALSE(absl::StrContains(log, "No space left on device")) << "the reserve stops writes before";
  EXPECT_TRUE(absl::StrContains(log, "state writes resumed")) << log;

  // Every accepted job ends, once; after a restart each is still succeeded:
  // all of it was stored.
  for (const std::string& id : accepted) {
    auto followed = farm.Kiln({"log", id, "-f"});  // Returns when the job has ended.
    ASSERT_TRUE(followed.ok());
  }
  farm.KillCoordinator(SIGTERM);
  ASSERT_TRUE(farm.RestartCoordinator().ok());
  for (const std::string& id : accepted) {
    auto st = farm.Kiln({"status", id, "--json"});
    ASSERT_TRUE(st.ok());
    auto j = nlohmann::json::parse(st->stdout_data, nullptr, false);
    ASSERT_TRUE(j.is_object()) << st->stdout_data << st->stderr_data;
    EXPECT_EQ(j.value("status", ""), "succeeded") << id << ": " << j.dump();
  }
  EXPECT_FALSE(reported_done.empty());
}

}  // namespace
}  // namespace kiln
