// examples/ci/kiln-ci.sh, the CI job teams copy, run as CI would run it:
// on a copy of examples/ (a monorepo of three flakes), against a real farm
// and Debian's docker-registry on 127.0.0.1. It builds everything as one
// buildset, pushes the one service image as :testing and :$GIT_SHA, and
// fails with the CLI's exit code when a target fails.
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "tests/support/local_farm.h"
#include "tests/support/local_registry.h"

namespace kiln {
namespace {
using testing::LocalFarm;
using testing::LocalRegistry;
using testing::ReadFileOrDie;
using testing::WriteFileOrDie;

constexpr char kUser[] = "ci";
constexpr char kPassword[] = "ci-example-secret-2718";

TEST(CiExampleE2eTest, BuildsTheMonorepoPushesImagesAndFailsLoudly) {
  auto registry = LocalRegistry::Start({kUser, kPassword});
  ASSERT_TRUE(registry.ok()) << registry.status();
  const std::string reg = (*registry)->address();
  testing::TempDir dir;
  WriteFileOrDie(dir.Sub("auth.json"), testing::DockerAuthConfig(reg, kUser, kPassword));
  LocalFarm farm(/*workers=*/0);
  farm.SetCoordinatorFlags({"--push-allow=127.0.0.1:*/kiln/*"});
  ASSERT_TRUE(farm.Start().ok());
  farm.SetWorkerFlags({"--registry-auth-file=" + dir.Sub("auth.json"), "--insecure-registries=" + reg});
  ASSERT_TRUE(farm.AddWorker().ok());

  // The monorepo: examples/ copied (outside any git work tree, so
  // --all-flakes finds its flakes by walking it).
  const std::string repo = dir.Sub("repo");
  auto copied = RunCommand({.argv = {"cp", "-r", testing::SourcePath("examples"), repo}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(copied.ok() && copied->exit.Success());
  auto run_ci = [&] {
    ProcessSpec spec;
    spec.argv = {"bash", testing::SourcePath("examples/ci/kiln-ci.sh")};
    spec.cwd = repo;
    spec.extra_env = {"KILN=" + testing::BinPath("kiln"), "KILN_COORDINATOR=" + farm.coordinator_address(),
                      absl::StrCat("KILN_PUSH_REPOSITORY=", reg, "/kiln"), "GIT_SHA=abc1234"};
    auto r = RunCommand(spec, "", absl::Minutes(5));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  };

  CommandResult ok = run_ci();
  ASSERT_EQ(ok.exit.exit_code, 0) << ok.stdout_data << ok.stderr_data;
  auto built = nlohmann::json::parse(ReadFileOrDie(repo + "/kiln-build.json"));
  ASSERT_EQ(built.size(), 3u) << built.dump();
  for (const auto& target : built)
    EXPECT_THAT(target["status"].get<std::string>(), ::testing::AnyOf("succeeded", "cached"));
  // Every event line of the build is JSON, one buildset's worth.
  int events = 0;
  for (absl::string_view line :
       absl::StrSplit(ReadFileOrDie(repo + "/kiln-build.events.jsonl"), '\n', absl::SkipEmpty())) {
    EXPECT_TRUE(nlohmann::json::parse(line, nullptr, false).is_object()) << line;
    ++events;
  }
  EXPECT_GE(events, 3 * 2);  // At least submitted and finished per target.
  auto pushed = nlohmann::json::parse(ReadFileOrDie(repo + "/kiln-push.json"));
  ASSERT_EQ(pushed.size(), 1u) << pushed.dump();  // hello-api is the one service with an image.
  const std::string digest = pushed[0]["pushed"]["manifestDigest"];
  EXPECT_THAT(ok.stdout_data, ::testing::HasSubstr(absl::StrCat("pushed  ", reg, "/kiln/hello-api@", digest)));
  for (const char* tag : {"testing", "abc1234"}) {
    auto inspect =
        RunCommand({.argv = {"skopeo", "inspect", "--tls-verify=false", "--creds", absl::StrCat(kUser, ":", kPassword),
                             absl::StrCat("docker://", reg, "/kiln/hello-api:", tag)},
                    .extra_env = {},
                    .cwd = ""},
                   "", absl::Minutes(1));
    ASSERT_TRUE(inspect.ok() && inspect->exit.Success()) << (inspect.ok() ? inspect->stderr_data : "");
    EXPECT_EQ(nlohmann::json::parse(inspect->stdout_data).value("Digest", ""), digest) << tag;
  }
  EXPECT_THAT(ok.stdout_data + ok.stderr_data, ::testing::Not(::testing::HasSubstr(kPassword)));

  // A service that does not build: the job fails with the CLI's exit code
  // and names it; nothing is pushed.
  WriteFileOrDie(repo + "/services/broken/flake.nix", R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "broken"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo the tests are red; exit 3" ];
    };
  };
})");
  CommandResult failed = run_ci();
  EXPECT_EQ(failed.exit.exit_code, 1) << failed.stdout_data << failed.stderr_data;
  EXPECT_THAT(failed.stdout_data, ::testing::HasSubstr("build failed (exit 1):"));
  EXPECT_THAT(failed.stdout_data, ::testing::HasSubstr("services/broken"));
  EXPECT_THAT(failed.stdout_data, ::testing::Not(::testing::HasSubstr("== push")));
}

}  // namespace
}  // namespace kiln
