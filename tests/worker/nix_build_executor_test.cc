// The rule that shares a worker's derivation slots and cores among its
// builds, and where it lands on Nix's command line. (Builds themselves are
// tested with real Nix in tests/e2e/worker_nix_e2e_test.cc.)
#include "worker/nix_build_executor.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace kiln {
namespace {

TEST(NixMaxJobsGrantTest, ABuildAloneGetsEverySlotAndBuildsStartedTogetherShare) {
  EXPECT_EQ(NixMaxJobsGrant(/*max_jobs=*/4, /*granted=*/0, /*waiting=*/1), 4);
  EXPECT_EQ(NixMaxJobsGrant(4, 0, 2), 2);
  EXPECT_EQ(NixMaxJobsGrant(4, 0, 4), 1);
  EXPECT_EQ(NixMaxJobsGrant(8, 0, 3), 2);
  EXPECT_EQ(NixMaxJobsGrant(4, 2, 1), 2);  // What the running builds left.
  // Never 0: a build started while every slot is granted still builds.
  EXPECT_EQ(NixMaxJobsGrant(4, 4, 1), 1);
  EXPECT_EQ(NixMaxJobsGrant(4, 7, 3), 1);
  EXPECT_EQ(NixMaxJobsGrant(1, 0, 0), 1);
}

TEST(NixMaxJobsGrantTest, DefaultCoresShareTheCpusAmongTheSlots) {
  EXPECT_EQ(DefaultCoresPerDerivation(16, 4), 4);
  EXPECT_EQ(DefaultCoresPerDerivation(16, 3), 5);
  EXPECT_EQ(DefaultCoresPerDerivation(2, 4), 1);
  EXPECT_EQ(DefaultCoresPerDerivation(8, 0), 8);
}

TEST(NixMaxJobsGrantTest, TheGrantAndCoresComeBeforeTheOperatorsOptions) {
  NixOptions options;
  options.max_jobs = 4;
  options.cores = 3;
  options.options = {{"max-jobs", "2"}};
  NixBuildExecutor executor(options);
  BuildRequest request;
  request.flake_dir = "/src";
  request.attr = "default";
  const std::vector<std::string> argv = executor.BuildArgv(request, 4);
  auto at = [&](const std::string& arg) { return std::find(argv.begin(), argv.end(), arg) - argv.begin(); };
  ASSERT_LT(at("--max-jobs"), static_cast<long>(argv.size()));
  EXPECT_EQ(argv[at("--max-jobs") + 1], "4");
  EXPECT_EQ(argv[at("--cores") + 1], "3");
  EXPECT_LT(at("--cores"), at("--option"));  // An operator's --nix-option=max-jobs=2 wins.
  EXPECT_EQ(argv.back(), "path:/src#default");
  // Without a grant (a command that builds nothing) neither is given.
  const std::vector<std::string> plain = executor.BuildArgv(request);
  EXPECT_EQ(std::find(plain.begin(), plain.end(), "--max-jobs"), plain.end());
  EXPECT_EQ(std::find(plain.begin(), plain.end(), "--cores"), plain.end());
}

}  // namespace
}  // namespace kiln
