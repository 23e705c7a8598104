// The daemons' command-line conventions on CLI11 (common/command_line.h):
// dashed names with the old underscore spellings, durations with units,
// lists, the config file, and the exit codes of help and bad usage.
#include "common/command_line.h"

#include <gtest/gtest.h>

#include <fstream>

#include "tests/support/test_util.h"

namespace kiln {
namespace {

struct Parsed {
  std::string listen = "127.0.0.1:7600";
  int max_jobs = 1;
  bool sync = false;
  absl::Duration lease = absl::Seconds(60);
  std::vector<std::string> labels;
};

std::optional<int> Parse(std::vector<std::string> args, Parsed& out) {
  CLI::App app("test", "kiln-test");
  UseKilnConventions(app);
  app.add_option("--metrics-listen", out.listen, "address");
  app.add_option("--max-jobs", out.max_jobs, "slots");
  app.add_flag("--sync-writes", out.sync, "fsync");
  AddDurationOption(app, "--lease", &out.lease, "lease");
  AddListOption(app, "--labels", &out.labels, "labels");
  AddConfigFileOption(app);
  args.insert(args.begin(), "kiln-test");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  return ParseCommandLine(app, static_cast<int>(argv.size()), argv.data());
}

TEST(CommandLine, DashedNamesAndTheOldUnderscoreSpellingsAreTheSameOption) {
  Parsed p;
  EXPECT_EQ(Parse({"--metrics-listen=127.0.0.1:1", "--max_jobs=4", "--sync-writes"}, p), std::nullopt);
  EXPECT_EQ(p.listen, "127.0.0.1:1");
  EXPECT_EQ(p.max_jobs, 4);
  EXPECT_TRUE(p.sync);
  Parsed q;
  EXPECT_EQ(Parse({"--max-jobs", "3", "--sync-writes=false"}, q), std::nullopt);
  EXPECT_EQ(q.max_jobs, 3);
  EXPECT_FALSE(q.sync);
  Parsed twice;
  EXPECT_EQ(Parse({"--max-jobs=2", "--max-jobs=5"}, twice), std::nullopt) << "scripts add overrides after defaults";
  EXPECT_EQ(twice.max_jobs, 5);
}

TEST(CommandLine, DurationsNeedUnitsAndListsSplitOnCommas) {
  Parsed p;
  EXPECT_EQ(Parse({"--lease=1h30m", "--labels=pool=a,region=b", "--labels=gpu=1"}, p), std::nullopt);
  EXPECT_EQ(p.lease, absl::Minutes(90));
  EXPECT_EQ(p.labels, (std::vector<std::string>{"pool=a", "region=b", "gpu=1"})) << "uses add up";
  Parsed zero;
  EXPECT_EQ(Parse({"--lease=0", "--labels="}, zero), std::nullopt);
  EXPECT_EQ(zero.lease, absl::ZeroDuration());
  EXPECT_TRUE(zero.labels.empty());
  Parsed bad;
  EXPECT_EQ(Parse({"--lease=10"}, bad), kExitUsage);
  EXPECT_EQ(Parse({"--lease=-5s"}, bad), kExitUsage);
}

TEST(CommandLine, UnknownOptionsAndBadValuesAreBadUsageAndHelpIsSuccess) {
  Parsed p;
  EXPECT_EQ(Parse({"--bogus=1"}, p), kExitUsage);
  EXPECT_EQ(Parse({"--max-jobs=many"}, p), kExitUsage);
  EXPECT_EQ(Parse({"stray"}, p), kExitUsage);
  EXPECT_EQ(Parse({"--help"}, p), kExitOk);
}

TEST(CommandLine, AConfigFileSetsOptionsTheCommandLineOverridesAndTyposAreRefused) {
  testing::TempDir dir;
  const std::string file = dir.Sub("kiln.toml");
  testing::WriteFileOrDie(file, "metrics-listen = \"127.0.0.1:2\"\nmax-jobs = 8\nlease = \"2m\"\n");
  Parsed p;
  EXPECT_EQ(Parse({"--config=" + file, "--max-jobs=2"}, p), std::nullopt);
  EXPECT_EQ(p.listen, "127.0.0.1:2");
  EXPECT_EQ(p.max_jobs, 2) << "the command line wins";
  EXPECT_EQ(p.lease, absl::Minutes(2));
  testing::WriteFileOrDie(file, "max-jbos = 8\n");
  Parsed typo;
  EXPECT_EQ(Parse({"--config=" + file}, typo), kExitUsage);
  Parsed missing;
  EXPECT_EQ(Parse({"--config=" + dir.Sub("absent.toml")}, missing), kExitUsage);
}

}  // namespace
}  // namespace kiln
