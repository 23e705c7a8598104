// Backup and restore against a real coordinator: `kiln-coordinator backup`
// through the running coordinator's admin socket, then a second coordinator
// started on the copy has the jobs, their logs and the FOD hashes; a
// backup refuses an existing destination and a missing state.
#include <csignal>
#include <fstream>
#include <iterator>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {
using testing::LocalFarm;
using testing::WriteFileOrDie;

std::string ReadIfThere(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A flake whose FOD declares a fake hash: the build fails, and the worker
// records the right hash in the coordinator's FOD cache.
std::string FakeHashFlake(const std::string& nonce) {
  return absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "vendored-NONCE"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo fetching NONCE; echo NONCE > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256";
      outputHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    };
  };
})",
                             {{"NONCE", nonce}});
}

TEST(BackupE2eTest, AFreshCoordinatorStartsFromTheBackupWithJobsLogsAndFodHashes) {
  LocalFarm farm(/*workers=*/1);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string nonce = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  WriteFileOrDie(work.Sub("fod/flake.nix"), FakeHashFlake(nonce));
  auto built = farm.Kiln({"build", work.Sub("fod"), "--json"});
  ASSERT_TRUE(built.ok());
  ASSERT_EQ(built->exit.exit_code, 1) << built->stderr_data;  // The fake hash.
  const std::string job = nlohmann::json::parse(built->stdout_data)[0]["jobId"];
  auto fods = farm.Kiln({"fod", "list", "--json"});
  ASSERT_TRUE(fods.ok());
  ASSERT_THAT(fods->stdout_data, ::testing::HasSubstr("vendored-" + nonce));
  auto log = farm.Kiln({"log", job});
  ASSERT_TRUE(log.ok());
  ASSERT_THAT(log->stdout_data, ::testing::HasSubstr("fetching " + nonce));
  auto status = farm.Kiln({"status", job, "--json"});
  ASSERT_TRUE(status.ok());

  // While the coordinator runs: through its admin socket.
  const std::string state = farm.dir().Sub("coordinator");
  const std::string copy = work.Sub("backup");
  auto backup =
      RunCommand({.argv = {testing::BinPath("kiln-coordinator"), "backup", "--state-dir=" + state, copy, "--json"},
                  .extra_env = {},
                  .cwd = ""},
                 "", absl::Seconds(60));
  ASSERT_TRUE(backup.ok());
  ASSERT_EQ(backup->exit.exit_code, 0) << backup->stderr_data;
  auto answer = nlohmann::json::parse(backup->stdout_data);
  EXPECT_EQ(answer["destination"], copy);
  EXPECT_TRUE(answer["hardLinked"].get<bool>());
  EXPECT_THAT(testing::ReadFileOrDie(farm.LogOf("coordinator")), ::testing::HasSubstr("backed the state up to"));

  // Again to the same place: refused, the first copy untouched.
  auto again = RunCommand({.argv = {testing::BinPath("kiln-coordinator"), "backup", "--state-dir=" + state, copy},
                           .extra_env = {},
                           .cwd = ""},
                          "", absl::Seconds(60));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->exit.exit_code, 1);
  EXPECT_THAT(again->stderr_data, ::testing::HasSubstr("exists already"));
  auto nothing = RunCommand(
      {.argv = {testing::BinPath("kiln-coordinator"), "backup", "--state-dir=" + work.Sub("no-state"), work.Sub("b2")},
       .extra_env = {},
       .cwd = ""},
      "", absl::Seconds(60));
  ASSERT_TRUE(nothing.ok());
  EXPECT_EQ(nothing->exit.exit_code, 1);
  EXPECT_THAT(nothing->stderr_data, ::testing::HasSubstr("no coordinator state in"));

  // The original goes away; a new coordinator on the copy answers as it did.
  farm.KillCoordinator(SIGTERM);
  const std::string ready = work.Sub("restored.ready");
  auto restored =
      testing::Daemon::Start({testing::BinPath("kiln-coordinator"), "--listen=127.0.0.1:0",
                              "--metrics-listen=127.0.0.1:0", "--state-dir=" + copy, "--ready-file=" + ready},
                             work.Sub("restored.log"), {});
  ASSERT_TRUE(restored.ok()) << restored.status();
  std::string address;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(30); absl::Now() < give_up && address.empty();) {
    auto j = nlohmann::json::parse(ReadIfThere(ready), nullptr, false);
    if (j.is_object()) address = j.value("grpc", "");
    if (address.empty()) absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_FALSE(address.empty()) << ReadIfThere(work.Sub("restored.log"));
  auto kiln = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {testing::BinPath("kiln"), "--coordinator=" + address});
    return RunCommand({.argv = args, .extra_env = {}, .cwd = ""}, "", absl::Seconds(60));
  };
  auto status_after = kiln({"status", job, "--json"});
  ASSERT_TRUE(status_after.ok());
  EXPECT_EQ(status_after->stdout_data, status->stdout_data);
  auto fods_after = kiln({"fod", "list", "--json"});
  ASSERT_TRUE(fods_after.ok());
  EXPECT_EQ(fods_after->stdout_data, fods->stdout_data);
  auto log_after = kiln({"log", job});
  ASSERT_TRUE(log_after.ok());
  EXPECT_EQ(log_after->stdout_data, log->stdout_data);
}

}  // namespace
}  // namespace kiln
