// Workers push images straight to a registry: a real coordinator and
// workers, the example image built by real Nix, Debian's docker-registry on
// 127.0.0.1 behind htpasswd, skopeo to check what arrived.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/subprocess.h"
#include "tests/support/local_farm.h"
#include "tests/support/local_registry.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::LocalFarm;
using testing::LocalRegistry;
using testing::ReadFileOrDie;
using testing::WriteFileOrDie;

constexpr char kUser[] = "kiln";
constexpr char kPassword[] = "push-secret-0815";
constexpr char kWrongPassword[] = "wrong-secret-4711";

std::string AuthFile(const std::string& registry, const std::string& password) {
  return testing::DockerAuthConfig(registry, kUser, password);
}

TEST(PushE2eTest, AWorkerPushesTheImageItBuiltAndOnlyWhatTheRegistryLacks) {
  auto registry = LocalRegistry::Start({kUser, kPassword});
  ASSERT_TRUE(registry.ok()) << registry.status();
  const std::string reg = (*registry)->address();
  testing::TempDir dir;
  WriteFileOrDie(dir.Sub("good.json"), AuthFile(reg, kPassword));
  WriteFileOrDie(dir.Sub("bad.json"), AuthFile(reg, kWrongPassword));

  LocalFarm farm(/*workers=*/0);
  farm.UsePrivateStores();  // Three workers, each its own machine.
  farm.SetCoordinatorFlags({"--push-allow=127.0.0.1:*/kiln/*"});
  ASSERT_TRUE(farm.Start().ok());
  farm.SetWorkerFlags(
      {"--labels=creds=good", "--registry-auth-file=" + dir.Sub("good.json"), "--insecure-registries=" + reg});
  ASSERT_TRUE(farm.AddWorker().ok());
  farm.SetWorkerFlags(
      {"--labels=creds=bad", "--registry-auth-file=" + dir.Sub("bad.json"), "--insecure-registries=" + reg});
  ASSERT_TRUE(farm.AddWorker().ok());

  const std::string image = testing::SourcePath("examples/services/hello-api") + "#oci-image";
  const std::string target = absl::StrCat(reg, "/kiln/hello-api:testing");
  auto first = farm.Kiln({"build", image, "--json", "--push=" + target, "--tag=v1", "--label=creds=good"});
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->exit.exit_code, 0) << first->stderr_data;
  auto j = nlohmann::json::parse(first->stdout_data);
  const auto& pushed = j[0]["pushed"];
  ASSERT_TRUE(pushed.is_object()) << j.dump();
  const std::string digest = pushed.value("manifestDigest", "");
  EXPECT_EQ(pushed.value("image", ""), absl::StrCat(reg, "/kiln/hello-api@", digest));
  EXPECT_EQ(pushed["layers"].size(), 2u);
  EXPECT_GT(pushed.value("bytesUploaded", 0), 0);

  // What skopeo sees under both tags.
  for (const char* tag : {"testing", "v1"}) {
    ProcessSpec inspect;
    inspect.argv = {"skopeo",
                    "inspect",
                    "--tls-verify=false",
                    "--creds",
                    absl::StrCat(kUser, ":", kPassword),
                    absl::StrCat("docker://", reg, "/kiln/hello-api:", tag)};
    auto r = RunCommand(inspect, "", absl::Minutes(1));
    ASSERT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : "");
    EXPECT_EQ(nlohmann::json::parse(r->stdout_data).value("Digest", ""), digest) << tag;
  }

  // Again: nothing built, nothing but the manifest sent.
  auto again = farm.Kiln({"build", image, "--json", "--push=" + target, "--tag=v1", "--label=creds=good"});
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(again->exit.exit_code, 0) << again->stderr_data;
  auto j2 = nlohmann::json::parse(again->stdout_data);
  EXPECT_EQ(j2[0]["pushed"].value("manifestDigest", ""), digest);
  EXPECT_EQ(j2[0]["pushed"].value("bytesUploaded", -1), 0) << j2.dump();
  for (const auto& l : j2[0]["pushed"]["layers"]) EXPECT_TRUE(l.value("skipped", false));

  // The streamLayeredImage shape: the output is a script that writes the
  // archive to stdout; the worker pushes what it writes as it comes, and the
  // registry gets the same image.
  const std::string stream = testing::SourcePath("examples/services/hello-api") + "#oci-stream";
  auto streamed = farm.Kiln(
      {"build", stream, "--json", "--push=" + absl::StrCat(reg, "/kiln/hello-stream:testing"), "--label=creds=good"});
  ASSERT_TRUE(streamed.ok());
  ASSERT_EQ(streamed->exit.exit_code, 0) << streamed->stderr_data;
  auto js = nlohmann::json::parse(streamed->stdout_data);
  EXPECT_EQ(js[0]["pushed"].value("manifestDigest", ""), digest) << js.dump();
  EXPECT_EQ(js[0]["pushed"].value("image", ""), absl::StrCat(reg, "/kiln/hello-stream@", digest));

  // `kiln push` from a laptop: the same pusher, the built archive, its own
  // credentials (here from the environment), into another repository.
  ProcessSpec push;
  push.argv = {testing::BinPath("kiln"),
               "push",
               j[0]["outputs"].value("out", ""),
               absl::StrCat(reg, "/kiln/from-laptop:dev"),
               "--insecure",
               "--json"};
  push.extra_env = {absl::StrCat("KILN_REGISTRY_USER=", kUser), absl::StrCat("KILN_REGISTRY_PASSWORD=", kPassword),
                    "KILN_CACHE_DIR=" + dir.Sub("cli-cache")};
  auto pushed_cli = RunCommand(push, "", absl::Minutes(2));
  ASSERT_TRUE(pushed_cli.ok());
  ASSERT_EQ(pushed_cli->exit.exit_code, 0) << pushed_cli->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(pushed_cli->stdout_data).value("manifestDigest", ""), digest)
      << pushed_cli->stdout_data;

  EXPECT_FALSE(absl::StrContains(pushed_cli->stderr_data, "MiB sent")) << "progress only on a terminal";

  // --gzip-level=fast: igzip's layers, another manifest of the same image
  // (skopeo reads it); a level that does not exist is refused up front.
  ProcessSpec fast = push;
  fast.argv = {testing::BinPath("kiln"),
               "push",
               j[0]["outputs"].value("out", ""),
               absl::StrCat(reg, "/kiln/from-laptop-fast:dev"),
               "--insecure",
               "--json",
               "--gzip-level=fast"};
  auto pushed_fast = RunCommand(fast, "", absl::Minutes(2));
  ASSERT_TRUE(pushed_fast.ok());
  ASSERT_EQ(pushed_fast->exit.exit_code, 0) << pushed_fast->stderr_data;
  const std::string fast_digest = nlohmann::json::parse(pushed_fast->stdout_data).value("manifestDigest", "");
  EXPECT_NE(fast_digest, digest);
  ProcessSpec inspect_fast;
  inspect_fast.argv = {"skopeo",
                       "inspect",
                       "--tls-verify=false",
                       "--creds",
                       absl::StrCat(kUser, ":", kPassword),
                       absl::StrCat("docker://", reg, "/kiln/from-laptop-fast:dev")};
  auto inspected = RunCommand(inspect_fast, "", absl::Minutes(1));
  ASSERT_TRUE(inspected.ok() && inspected->exit.Success()) << (inspected.ok() ? inspected->stderr_data : "");
  EXPECT_EQ(nlohmann::json::parse(inspected->stdout_data).value("Digest", ""), fast_digest);
  fast.argv.back() = "--gzip-level=0";
  auto bad_level = RunCommand(fast, "", absl::Minutes(1));
  ASSERT_TRUE(bad_level.ok());
  EXPECT_EQ(bad_level->exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(bad_level->stderr_data, "gzip level \"0\"")) << bad_level->stderr_data;

  // A worker started with --push-gzip-level=fast pushes the same bytes the
  // CLI did at that level: the same manifest, in the repository it names.
  farm.SetWorkerFlags({"--labels=creds=fast", "--registry-auth-file=" + dir.Sub("good.json"),
                       "--insecure-registries=" + reg, "--push-gzip-level=fast"});
  ASSERT_TRUE(farm.AddWorker().ok());
  auto by_fast_worker = farm.Kiln(
      {"build", image, "--json", "--push=" + absl::StrCat(reg, "/kiln/hello-fast:testing"), "--label=creds=fast"});
  ASSERT_TRUE(by_fast_worker.ok());
  ASSERT_EQ(by_fast_worker->exit.exit_code, 0) << by_fast_worker->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(by_fast_worker->stdout_data)[0]["pushed"].value("manifestDigest", ""), fast_digest)
      << by_fast_worker->stdout_data;

  // On a terminal (script(1) gives it one): a progress line, rewritten in
  // place, erased before the result.
  ProcessSpec on_tty;
  on_tty.argv = {"script", "-qec",
                 absl::StrCat(testing::BinPath("kiln"), " push ", j[0]["outputs"].value("out", ""), " ", reg,
                              "/kiln/from-terminal:dev --insecure"),
                 "/dev/null"};
  on_tty.extra_env = push.extra_env;
  auto tty = RunCommand(on_tty, "", absl::Minutes(2));
  ASSERT_TRUE(tty.ok());
  EXPECT_EQ(tty->exit.exit_code, 0) << tty->stdout_data;
  EXPECT_TRUE(absl::StrContains(tty->stdout_data, "layer(s) in the registry")) << tty->stdout_data;
  EXPECT_TRUE(absl::StrContains(tty->stdout_data, "\r\033[K")) << tty->stdout_data;
  EXPECT_TRUE(absl::StrContains(tty->stdout_data, absl::StrCat(reg, "/kiln/from-terminal@", digest)))
      << tty->stdout_data;

  // Outside the allowlist: refused at submission.
  auto refused = farm.Kiln({"build", image, "--push=" + absl::StrCat(reg, "/elsewhere/x:testing")});
  ASSERT_TRUE(refused.ok());
  EXPECT_EQ(refused->exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(refused->stderr_data, "is not allowed by this coordinator")) << refused->stderr_data;

  // Wrong credentials: built, not pushed, said so; no password anywhere.
  auto denied = farm.Kiln({"build", image, "--json", "--push=" + target, "--label=creds=bad"});
  ASSERT_TRUE(denied.ok());
  EXPECT_EQ(denied->exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(denied->stdout_data + denied->stderr_data, "UNAUTHORIZED"))
      << denied->stdout_data << denied->stderr_data;
  auto good = testing::ScrapeMetrics(farm.worker_metrics()[0]);
  auto bad = testing::ScrapeMetrics(farm.worker_metrics()[1]);
  ASSERT_TRUE(good.ok() && bad.ok());
  // First push: three blobs sent; again: three skipped; the stream into a
  // new repository: two layers mounted, the config sent.
  EXPECT_TRUE(absl::StrContains(*good, "kiln_worker_pushed_blobs_total{result=\"skipped\"} 3")) << *good;
  EXPECT_TRUE(absl::StrContains(*good, "kiln_worker_pushed_blobs_total{result=\"mounted\"} 2")) << *good;
  EXPECT_TRUE(absl::StrContains(*good, "kiln_worker_pushed_blobs_total{result=\"pushed\"} 4")) << *good;
  EXPECT_TRUE(absl::StrContains(*bad, "kiln_worker_push_failures_total{code=\"unauthorized\"} 1")) << *bad;

  std::string everything = first->stdout_data + first->stderr_data + again->stdout_data + again->stderr_data +
                           streamed->stdout_data + streamed->stderr_data + pushed_cli->stdout_data +
                           pushed_cli->stderr_data + tty->stdout_data + denied->stdout_data + denied->stderr_data +
                           ReadFileOrDie(farm.LogOf("coordinator")) + ReadFileOrDie(farm.LogOf("worker-1")) +
                           ReadFileOrDie(farm.LogOf("worker-2"));
  auto metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  if (metrics.ok()) everything += *metrics;
  everything += *good + *bad;
  for (const char* secret : {kPassword, kWrongPassword}) {
    EXPECT_FALSE(absl::StrContains(everything, secret)) << secret;
    EXPECT_FALSE(absl::StrContains(everything, absl::Base64Escape(absl::StrCat(kUser, ":", secret))));
  }
}

}  // namespace
}  // namespace kiln
