// A worker whose work directory is small (a 20 MiB tmpfs mounted at it): a
// source that cannot fit fails with a reason and leaves the disk as it
// found it, so the next job builds; temporary files a killed worker left in
// its source cache are swept when it starts; the free space is reported.
#include <gtest/gtest.h>
#include <sys/statvfs.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/net.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;
using testing::LocalFarm;
using testing::WriteFileOrDie;

std::string TrivialFlake(const std::string& marker) {
  return testing::ShellFlake("disk-test", absl::StrCat("echo ", marker, " > $out"));
}

uint64_t FreeBytes(const std::string& path) {
  struct statvfs s;
  if (::statvfs(path.c_str(), &s) != 0) return 0;
  return static_cast<uint64_t>(s.f_bavail) * s.f_frsize;
}

std::vector<std::string> Leftovers(const std::string& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (IsAtomicWriteLeftover(name) || absl::EndsWith(name, ".tmp")) found.push_back(it->path().string());
  }
  return found;
}

TEST(WorkerDiskE2eTest, ASourceThatDoesNotFitFailsWithAReasonAndTheWorkerGoesOn) {
  LocalFarm farm(/*workers=*/0);
  farm.SetCoordinatorFlags({"--worker-min-work-dir-free-mb=1", "--retry-backoff=200ms"});
  ASSERT_TRUE(farm.Start().ok());
  const std::string work_dir = farm.dir().Sub("worker-1");
  fs::create_directories(work_dir);
  testing::ScopedTmpfs small_disk(work_dir, "20m");
  ASSERT_TRUE(small_disk.status().ok()) << small_disk.status();
  ASSERT_TRUE(farm.AddWorker().ok());

  // A flake with a 30 MiB file (random: nothing compresses it away).
  testing::TempDir src;
  WriteFileOrDie(src.Sub("big/flake.nix"), TrivialFlake(absl::StrCat("big-", absl::ToUnixNanos(absl::Now()))));
  {
    std::ofstream big(src.Sub("big/data.bin"), std::ios::binary);
    std::mt19937_64 random(7);
    for (int i = 0; i < (30 << 20) / 8; ++i) {
      const uint64_t v = random();
      big.write(reinterpret_cast<const char*>(&v), sizeof v);
    }
  }
  auto failed = farm.Kiln({"build", src.Sub("big"), "--json"});
  ASSERT_TRUE(failed.ok()) << failed.status();
  EXPECT_NE(failed->exit.exit_code, 0);
  auto entries = nlohmann::json::parse(failed->stdout_data, nullptr, false);
  ASSERT_TRUE(entries.is_array() && entries.size() == 1) << failed->stdout_data << failed->stderr_data;
  const std::string error = entries[0].value("error", "");
  EXPECT_TRUE(absl::StrContains(error, "no space left on the worker's work directory (")) << entries[0].dump();
  EXPECT_TRUE(absl::StrContains(error, " MiB needed)")) << error;

  // Nothing of it stayed: the disk is as free as before, and the next job runs.
  EXPECT_GT(FreeBytes(work_dir), uint64_t{18} << 20);
  EXPECT_TRUE(Leftovers(work_dir).empty());
  WriteFileOrDie(src.Sub("small/flake.nix"), TrivialFlake(absl::StrCat("small-", absl::ToUnixNanos(absl::Now()))));
  auto built = farm.Kiln({"build", src.Sub("small")});
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->exit.exit_code, 0) << built->stderr_data;

  // The work directory's free space is reported.
  auto workers = farm.Kiln({"workers", "--json"});
  ASSERT_TRUE(workers.ok());
  auto listed = nlohmann::json::parse(workers->stdout_data, nullptr, false);
  ASSERT_TRUE(listed.is_array() && listed.size() == 1) << workers->stdout_data;
  EXPECT_GT(listed[0].value("workDirFreeBytes", int64_t{0}), int64_t{10} << 20) << listed.dump();
  EXPECT_LE(listed[0].value("workDirFreeBytes", int64_t{0}), int64_t{20} << 20) << listed.dump();

  // Temporary files a killed worker left in its cache are gone after a start.
  farm.KillWorker(0, SIGKILL);
  const std::string shard = work_dir + "/cas/ab";
  fs::create_directories(shard);
  WriteFileOrDie(shard + "/ab" + std::string(62, '0') + std::string(kAtomicWriteSuffix) + "123.0",
                 std::string(4 << 20, 'x'));
  WriteFileOrDie(shard + "/ab" + std::string(62, '1') + ".tmp", "from an older worker");
  WriteFileOrDie(shard + "/ab" + std::string(62, '2'), "a cached blob");
  ASSERT_EQ(Leftovers(work_dir).size(), 2u);
  ASSERT_TRUE(farm.RestartWorker(0).ok());
  EXPECT_TRUE(Leftovers(work_dir).empty()) << Leftovers(work_dir)[0];
  EXPECT_TRUE(fs::exists(shard + "/ab" + std::string(62, '2')));
}

}  // namespace
}  // namespace kiln
