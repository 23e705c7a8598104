// End to end: real kiln-coordinator and kiln-worker processes on 127.0.0.1,
// real `nix build`, driven through the real `kiln` CLI.
#include <sys/stat.h>

#include <filesystem>
#include <regex>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/cas_client.h"
#include "common/grpc_util.h"
#include "common/source_tree.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {
namespace fs = std::filesystem;
using testing::LocalFarm;
using testing::ReadFileOrDie;
using testing::WriteFileOrDie;

// Each test builds something no earlier run has built, so Nix really builds.
std::string Nonce() { return absl::StrCat(absl::ToUnixNanos(absl::Now())); }

std::string TrivialFlake(const std::string& name, const std::string& script) {
  return absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "NAME"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "SCRIPT" ];
    };
  };
})",
                             {{"NAME", name}, {"SCRIPT", script}});
}

class BuildE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    farm_ = new LocalFarm(/*workers=*/2, /*max_jobs_per_worker=*/2);
    absl::Status s = farm_->Start();
    ASSERT_TRUE(s.ok()) << s;
  }
  static void TearDownTestSuite() {
    delete farm_;
    farm_ = nullptr;
  }
  static LocalFarm* farm_;
  testing::TempDir work_;
};
LocalFarm* BuildE2eTest::farm_ = nullptr;

TEST_F(BuildE2eTest, BuildsExampleFlakeAndPrintsTheOutputPath) {
  // The greeter example, with a fresh marker so this run really builds it.
  const std::string nonce = Nonce();
  std::string flake = ReadFileOrDie(testing::SourcePath("examples/services/greeter/flake.nix"));
  flake = absl::StrReplaceAll(flake, {{"writing greeter", "writing greeter " + nonce}});
  WriteFileOrDie(work_.Sub("greeter/flake.nix"), flake);

  auto r = farm_->Kiln({"build", work_.Sub("greeter")});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit.exit_code, 0) << r->stderr_data;
  // The build log streamed back, tagged with the derivation like nix -L.
  EXPECT_TRUE(absl::StrContains(r->stderr_data, "greeter> writing greeter " + nonce)) << r->stderr_data;
  const std::string path(absl::StripTrailingAsciiWhitespace(r->stdout_data));
  ASSERT_TRUE(absl::StartsWith(path, "/nix/store/")) << r->stdout_data;
  // In the store of the worker that built it (each has its own).
  size_t worker = 0;
  EXPECT_EQ(ReadFileOrDie(farm_->HostPathOf(path, &worker)), "#!/bin/sh\necho \"hello from greeter\"\n");
  auto run = RunCommand(farm_->OnWorkerMachine(worker, {path}));
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(run->stdout_data, "hello from greeter\n");
}

TEST_F(BuildE2eTest, JsonOutputMatchesNixBuildJsonShape) {
  auto r = farm_->Kiln({"build", testing::SourcePath("examples/services/hello-api") + "#oci-image", "--json"});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->exit.exit_code, 0) << r->stderr_data;
  nlohmann::json j = nlohmann::json::parse(r->stdout_data);
  ASSERT_TRUE(j.is_array());
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["status"], "succeeded");
  EXPECT_TRUE(absl::EndsWith(j[0]["drvPath"].get<std::string>(), "-hello-api-image.tar.gz.drv"));
  const std::string image = j[0]["outputs"]["out"];
  EXPECT_TRUE(absl::StartsWith(j[0]["worker"].get<std::string>(), "worker-"));
  // The output is a docker-archive like buildLayeredImage's: manifest, config, layers.
  auto listing = RunCommand({.argv = {"tar", "-tzf", image}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(listing.ok());
  EXPECT_TRUE(absl::StrContains(listing->stdout_data, "./manifest.json"));
  auto manifest_text = RunCommand({.argv = {"tar", "-xzOf", image, "./manifest.json"}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(manifest_text.ok());
  nlohmann::json manifest = nlohmann::json::parse(manifest_text->stdout_data);
  ASSERT_EQ(manifest[0]["Layers"].size(), 2u);
  EXPECT_TRUE(absl::StrContains(listing->stdout_data, manifest[0]["Config"].get<std::string>()));
}

TEST_F(BuildE2eTest, FailingBuildExitsNonZeroWithNixsMessage) {
  WriteFileOrDie(work_.Sub("bad/flake.nix"),
                 TrivialFlake("doomed", absl::StrCat("echo about to fail ", Nonce(), "; exit 7")));
  auto r = farm_->Kiln({"build", work_.Sub("bad")});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r->stderr_data, "doomed> about to fail")) << r->stderr_data;
  EXPECT_TRUE(std::regex_search(r->stderr_data, std::regex("error: builder for '/nix/store/[a-z0-9]+-doomed.drv' "
                                                           "failed with exit code 7")))
      << r->stderr_data;
  EXPECT_TRUE(r->stdout_data.empty());

  auto json = farm_->Kiln({"build", work_.Sub("bad"), "--json"});
  ASSERT_TRUE(json.ok());
  EXPECT_EQ(json->exit.exit_code, 1);
  nlohmann::json j = nlohmann::json::parse(json->stdout_data);
  EXPECT_EQ(j[0]["status"], "failed");
  EXPECT_TRUE(absl::StrContains(j[0]["error"].get<std::string>(), "failed with exit code 7"));
}

TEST_F(BuildE2eTest, TimeoutsStopTheBuildAndSaySo) {
  WriteFileOrDie(work_.Sub("slow/flake.nix"),
                 TrivialFlake("sleepy", absl::StrCat("echo started ", Nonce(), "; /bin/sleep 60")));
  const absl::Time start = absl::Now();
  auto r = farm_->Kiln({"build", work_.Sub("slow"), "--json", "--quiet", "--timeout=1s"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit.exit_code, 1);
  nlohmann::json j = nlohmann::json::parse(r->stdout_data);
  EXPECT_EQ(j[0]["status"], "failed");
  EXPECT_THAT(j[0]["error"].get<std::string>(), ::testing::HasSubstr("timed out after 1 seconds")) << j.dump();
  EXPECT_LT(absl::Now() - start, absl::Seconds(50));  // Not the builder's 60 s: it was stopped.

  WriteFileOrDie(work_.Sub("quiet/flake.nix"),
                 TrivialFlake("quiet", absl::StrCat("echo started ", Nonce(), "; /bin/sleep 60")));
  auto silent = farm_->Kiln({"build", work_.Sub("quiet"), "--json", "--quiet", "--max-silent-time=1s"});
  ASSERT_TRUE(silent.ok());
  EXPECT_EQ(silent->exit.exit_code, 1);
  nlohmann::json k = nlohmann::json::parse(silent->stdout_data);
  EXPECT_THAT(k[0]["error"].get<std::string>(), ::testing::HasSubstr("of silence")) << k.dump();
}

TEST_F(BuildE2eTest, EvaluationErrorsComeBackFromNix) {
  WriteFileOrDie(work_.Sub("eval/flake.nix"),
                 "{ outputs = { self }: { packages.x86_64-linux.default = throw \"kiln-eval-boom\"; }; }");
  auto r = farm_->Kiln({"build", work_.Sub("eval")});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(r->stderr_data, "kiln-eval-boom")) << r->stderr_data;

  auto missing = farm_->Kiln({"build", work_.Sub("eval") + "#nope"});
  ASSERT_TRUE(missing.ok());
  EXPECT_EQ(missing->exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(missing->stderr_data, "does not provide attribute 'packages.x86_64-linux.nope'"))
      << missing->stderr_data;
}

TEST_F(BuildE2eTest, BadInputIsRefusedBeforeAnythingIsSubmitted) {
  auto no_flake = farm_->Kiln({"build", work_.path()});
  ASSERT_TRUE(no_flake.ok());
  EXPECT_EQ(no_flake->exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(no_flake->stderr_data, "does not contain a 'flake.nix'")) << no_flake->stderr_data;
  auto injection = farm_->Kiln({"build", testing::SourcePath("examples/services/greeter") + "#--option"});
  ASSERT_TRUE(injection.ok());
  EXPECT_EQ(injection->exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(injection->stderr_data, "invalid attribute path")) << injection->stderr_data;
  auto remote = farm_->Kiln({"build", "github:nixos/nixpkgs#hello"});
  ASSERT_TRUE(remote.ok());
  EXPECT_EQ(remote->exit.exit_code, 2);
  auto priority = farm_->Kiln({"build", testing::SourcePath("examples/services/greeter"), "--priority=urgent"});
  ASSERT_TRUE(priority.ok());
  EXPECT_EQ(priority->exit.exit_code, 2);
  EXPECT_THAT(priority->stderr_data, ::testing::HasSubstr("unknown priority class 'urgent'; this coordinator has: "
                                                          "interactive, ci, batch"));
}

TEST_F(BuildE2eTest, UnreachableCoordinatorIsExitCodeThreeAndNamesTheAddress) {
  // Port 1 on loopback: nothing listens there.
  auto r = RunCommand({.argv = {testing::BinPath("kiln"), "--coordinator=127.0.0.1:1", "build",
                                testing::SourcePath("examples/services/greeter"), "--json"},
                       .extra_env = {},
                       .cwd = ""});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit.exit_code, 3);
  EXPECT_TRUE(absl::StrContains(r->stderr_data, "cannot reach the Kiln coordinator at 127.0.0.1:1")) << r->stderr_data;
  nlohmann::json j = nlohmann::json::parse(r->stdout_data);
  EXPECT_EQ(j[0]["status"], "rejected");
  for (const char* command : {"status", "cancel"}) {
    auto other = RunCommand(
        {.argv = {testing::BinPath("kiln"), "--coordinator=127.0.0.1:1", command, "1"}, .extra_env = {}, .cwd = ""});
    ASSERT_TRUE(other.ok());
    EXPECT_EQ(other->exit.exit_code, 3) << command;
    EXPECT_TRUE(absl::StrContains(other->stderr_data, "cannot reach the Kiln coordinator at 127.0.0.1:1"))
        << command << ": " << other->stderr_data;
  }
}

// The coordinator goes away for good mid-build: kiln gives up after
// --reconnect-timeout with exit 3, and says how to find the builds later.
TEST_F(BuildE2eTest, ACoordinatorGoneForGoodLeavesTheBuildsetIdToFollowUp) {
  LocalFarm farm(/*workers=*/1);
  ASSERT_TRUE(farm.Start().ok());
  WriteFileOrDie(work_.Sub("gone/flake.nix"), absl::StrCat(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "gone"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo )",
                                                           Nonce(), R"(; /bin/sleep 30; echo done > $out" ];
    };
  };
})"));
  testing::BackgroundBuild build(farm, {work_.Sub("gone"), "--reconnect-timeout=2s"});
  ASSERT_TRUE(build.spawn_status().ok());
  ASSERT_FALSE(build.WaitForJobId(absl::Seconds(30)).empty());
  farm.KillCoordinator(SIGKILL);
  ASSERT_TRUE(build.WaitDone(absl::Seconds(60)));
  EXPECT_EQ(build.exit().exit_code, 3) << build.stderr_data();
  EXPECT_TRUE(absl::StrContains(build.stderr_data(), "see them later with: kiln status b1")) << build.stderr_data();
}

TEST_F(BuildE2eTest, CancelKillsTheWholeBuildTree) {
  const std::string marker = absl::StrCat("kiln-cancel-marker-", Nonce());
  // The builder starts a background sleeper: only a process-group kill ends it.
  WriteFileOrDie(
      work_.Sub("slow/flake.nix"),
      TrivialFlake("slow", absl::StrCat("/bin/sh -c '/bin/sleep 300; : ", marker, "' & echo started; wait")));
  testing::BackgroundBuild build(*farm_, {work_.Sub("slow")});
  ASSERT_TRUE(build.spawn_status().ok()) << build.spawn_status();
  // Wait (bounded) until the sleeper runs.
  bool running = false;
  for (int i = 0; i < 600 && !running; ++i) {
    auto p = RunCommand({.argv = {"pgrep", "-f", marker}, .extra_env = {}, .cwd = ""});
    running = p.ok() && p->exit.Success();
    if (!running) absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(running) << "the build never started";
  const std::string id = build.WaitForJobId(absl::Seconds(30));
  ASSERT_FALSE(id.empty());
  auto cancel = farm_->Kiln({"cancel", id});
  ASSERT_TRUE(cancel.ok());
  EXPECT_EQ(cancel->exit.exit_code, 0) << cancel->stderr_data;
  ASSERT_TRUE(build.WaitDone(absl::Seconds(60)));
  EXPECT_EQ(build.exit().exit_code, 1);
  bool gone = false;
  for (int i = 0; i < 200 && !gone; ++i) {
    auto p = RunCommand({.argv = {"pgrep", "-f", marker}, .extra_env = {}, .cwd = ""});
    gone = p.ok() && !p->exit.Success();
    if (!gone) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(gone) << "the build's background process survived the cancel";
  auto status = farm_->Kiln({"status", id, "--json"});
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(nlohmann::json::parse(status->stdout_data)["status"], "cancelled");
}

TEST_F(BuildE2eTest, MetricsOfBothDaemonsPassPromtool) {
  // At least one finished build, so histograms have samples.
  auto r = farm_->Kiln({"build", testing::SourcePath("examples/services/assets")});
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->exit.exit_code, 0) << r->stderr_data;

  std::vector<std::string> endpoints = {farm_->coordinator_metrics()};
  endpoints.insert(endpoints.end(), farm_->worker_metrics().begin(), farm_->worker_metrics().end());
  for (const auto& address : endpoints) {
    auto text = testing::ScrapeMetrics(address);
    ASSERT_TRUE(text.ok()) << text.status();
    auto check = RunCommand({.argv = {"promtool", "check", "metrics"}, .extra_env = {}, .cwd = ""}, *text);
    ASSERT_TRUE(check.ok());
    EXPECT_EQ(check->exit.exit_code, 0) << address << ":\n" << check->stdout_data << check->stderr_data;
  }
  auto coordinator = testing::ScrapeMetrics(farm_->coordinator_metrics());
  ASSERT_TRUE(coordinator.ok());
  for (const char* name :
       {"kiln_jobs_queued{priority=\"interactive\",system=\"x86_64-linux\"} ", "kiln_workers{state=\"connected\"} 2",
        "kiln_workers{state=\"draining\"} 0", "kiln_farm_slots 4", "kiln_farm_slots_used ",
        "kiln_jobs_finished_total{result=\"succeeded\"}", "kiln_build_duration_seconds_bucket",
        "kiln_job_queue_wait_seconds_count", "kiln_dispatch_duration_seconds_count",
        "kiln_job_requeues_total{reason=\"lease_expired\"}"}) {
    EXPECT_TRUE(absl::StrContains(*coordinator, name)) << name;
  }
  auto worker = testing::ScrapeMetrics(farm_->worker_metrics()[0]);
  ASSERT_TRUE(worker.ok());
  for (const char* name : {"kiln_worker_builds_running ", "kiln_worker_coordinator_connected 1",
                           "kiln_worker_build_duration_seconds_bucket"}) {
    EXPECT_TRUE(absl::StrContains(*worker, name)) << name;
  }
}

// Regular files under `dir` (a worker's blob cache).
int CachedBlobs(const std::string& dir) {
  int n = 0;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_regular_file()) ++n;
  }
  return n;
}

TEST(SourceTransportE2eTest, AWorkersBlobCacheStaysWithinItsCap) {
  LocalFarm farm(/*workers=*/1, /*max_jobs_per_worker=*/1);
  farm.SetCoordinatorFlags({"--inline-source-kb=0"});
  farm.SetWorkerFlags({"--blob-cache-mb=0"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  WriteFileOrDie(work.Sub("svc/flake.nix"), TrivialFlake("capped", "echo " + Nonce() + " > $out"));
  auto r = farm.Kiln({"build", work.Sub("svc")});
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->exit.exit_code, 0) << r->stderr_data;
  EXPECT_EQ(CachedBlobs(farm.dir().Sub("worker-1/cas")), 0);
  EXPECT_TRUE(absl::StrContains(ReadFileOrDie(farm.LogOf("worker-1")), "blob cache: removed 1"))
      << ReadFileOrDie(farm.LogOf("worker-1"));
}

// Sources through the CAS: a farm whose assignments never carry files, so
// workers fetch them into their blob cache; the CLI sends only what the
// coordinator lacks.
TEST(SourceTransportE2eTest, WorkersFetchMissingFilesAndAnUnchangedTargetIsCachedAndUploadsNothing) {
  LocalFarm farm(/*workers=*/1, /*max_jobs_per_worker=*/2);
  farm.SetCoordinatorFlags({"--inline-source-kb=0"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string nonce = Nonce();
  WriteFileOrDie(work.Sub("svc/flake.nix"),
                 TrivialFlake("fetched", "read x < ${./data/message.txt}; echo $x " + nonce + " > $out"));
  WriteFileOrDie(work.Sub("svc/data/message.txt"), "hello-from-the-cas\n");
  auto first = farm.Kiln({"build", work.Sub("svc")});
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->exit.exit_code, 0) << first->stderr_data;
  EXPECT_TRUE(absl::StrContains(first->stderr_data, "uploaded 4 blob(s)")) << first->stderr_data;
  const std::string path(absl::StripTrailingAsciiWhitespace(first->stdout_data));
  EXPECT_EQ(ReadFileOrDie(path), "hello-from-the-cas " + nonce + "\n");
  // The worker fetched the two files (the directories came with the job).
  EXPECT_TRUE(absl::StrContains(ReadFileOrDie(farm.LogOf("worker-1")), "fetched 2 source blob(s)"))
      << ReadFileOrDie(farm.LogOf("worker-1"));
  EXPECT_EQ(CachedBlobs(farm.dir().Sub("worker-1/cas")), 2);  // Kept for the next build.

  // Again, unchanged: nothing is uploaded and nothing builds — the result
  // cache answers, with the same output.
  auto again = farm.Kiln({"build", work.Sub("svc"), "--json"});
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(again->exit.exit_code, 0) << again->stderr_data;
  EXPECT_FALSE(absl::StrContains(again->stderr_data, "uploaded")) << again->stderr_data;
  nlohmann::json cached = nlohmann::json::parse(again->stdout_data);
  EXPECT_EQ(cached[0]["status"], "cached");
  EXPECT_EQ(cached[0]["outputs"]["out"], path);
  // --rebuild builds it again (Nix on the worker finds the output valid).
  auto rebuilt = farm.Kiln({"build", work.Sub("svc"), "--json", "--rebuild"});
  ASSERT_TRUE(rebuilt.ok());
  ASSERT_EQ(rebuilt->exit.exit_code, 0) << rebuilt->stderr_data;
  nlohmann::json fresh = nlohmann::json::parse(rebuilt->stdout_data);
  EXPECT_EQ(fresh[0]["status"], "succeeded");
  EXPECT_EQ(fresh[0]["cached"], false);
  EXPECT_EQ(fresh[0]["outputs"]["out"], path);
  // A tampered upload, straight at the running coordinator: refused, nothing
  // stored, counted.
  auto cas = kiln::v1::CasService::NewStub(MakeChannel(farm.coordinator_address()));
  const std::string real = "what the digest promises";
  {
    grpc::ClientContext context;
    kiln::v1::WriteBlobsResponse response;
    auto writer = cas->WriteBlobs(&context, &response);
    kiln::v1::WriteBlobsChunk chunk;
    *chunk.mutable_digest() = DigestOf(real);
    chunk.set_data(std::string(real.size(), 'x'));
    chunk.set_last(true);
    writer->Write(chunk);
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  }
  EXPECT_TRUE(absl::IsNotFound(
      FetchBlobs(*cas, {DigestOf(real)}, [](const kiln::v1::Digest&, std::string&&) { return absl::OkStatus(); })));
  const auto metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(metrics.ok());
  EXPECT_TRUE(absl::StrContains(*metrics, "kiln_cas_uploaded_blobs_total 4")) << *metrics;
  EXPECT_TRUE(absl::StrContains(*metrics, "kiln_cas_rejected_blobs_total 1")) << *metrics;
  EXPECT_TRUE(absl::StrContains(*metrics, "kiln_result_cache_lookups_total{result=\"hit\"} 1")) << *metrics;
}

// A monorepo: the examples' services in one git work tree, built with
// --all-flakes as one buildset through real workers.
TEST(MonorepoE2eTest, AllFlakesIsOneBuildsetAndOnlyAChangedServiceBuildsAgain) {
  LocalFarm farm(/*workers=*/2, /*max_jobs_per_worker=*/2);
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir repo;
  const std::string nonce = Nonce();
  for (const char* svc : {"greeter", "assets", "hello-api"}) {
    std::string flake = ReadFileOrDie(testing::SourcePath(absl::StrCat("examples/services/", svc, "/flake.nix")));
    // A fresh marker in the non-fixed-output ones, so this run really builds.
    if (std::string(svc) != "assets") flake = absl::StrReplaceAll(flake, {{"echo ", "echo " + nonce + "; echo "}});
    WriteFileOrDie(repo.Sub(absl::StrCat("services/", svc, "/flake.nix")), flake);
  }
  WriteFileOrDie(repo.Sub("README.md"), "a monorepo\n");
  for (std::vector<std::string> args : std::vector<std::vector<std::string>>{
           {"git", "init", "-q"},
           {"git", "add", "."},
           {"git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"}}) {
    auto r = RunCommand({.argv = args, .extra_env = {}, .cwd = repo.path()});
    ASSERT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
  }
  const auto build = [&](std::vector<std::string> extra) {
    ProcessSpec spec = farm.KilnSpec({"build", "--all-flakes", "--json"});
    spec.argv.insert(spec.argv.end(), extra.begin(), extra.end());
    spec.cwd = repo.Sub("services/greeter");  // Anywhere inside the work tree.
    auto r = RunCommand(spec, "", absl::Minutes(3));
    EXPECT_TRUE(r.ok()) << r.status();
    return *r;
  };
  auto first = build({});
  ASSERT_EQ(first.exit.exit_code, 0) << first.stderr_data;
  EXPECT_TRUE(absl::StrContains(first.stderr_data, "submitted 3 target(s) as one buildset")) << first.stderr_data;
  nlohmann::json j = nlohmann::json::parse(first.stdout_data);
  ASSERT_EQ(j.size(), 3u);
  for (const auto& e : j) EXPECT_EQ(e["status"], "succeeded") << e.dump();

  // Unchanged: all cache hits, nothing uploaded.
  auto second = build({});
  ASSERT_EQ(second.exit.exit_code, 0) << second.stderr_data;
  // One line per target at the end, like a CI matrix.
  EXPECT_TRUE(absl::StrContains(second.stderr_data, "kiln: 3 target(s):")) << second.stderr_data;
  EXPECT_TRUE(std::regex_search(second.stderr_data, std::regex("  cached +\\S*greeter#default \\(job \\d+ on worker-")))
      << second.stderr_data;
  EXPECT_FALSE(absl::StrContains(second.stderr_data, "uploaded")) << second.stderr_data;
  j = nlohmann::json::parse(second.stdout_data);
  for (const auto& e : j) EXPECT_EQ(e["status"], "cached") << e.dump();

  // One service changed (a working-tree edit, uncommitted): only it builds.
  const std::string greeter = repo.Sub("services/greeter/flake.nix");
  WriteFileOrDie(greeter, absl::StrReplaceAll(ReadFileOrDie(greeter), {{nonce, nonce + "-edited"}}));
  auto third = build({});
  ASSERT_EQ(third.exit.exit_code, 0) << third.stderr_data;
  j = nlohmann::json::parse(third.stdout_data);
  int built = 0, cached = 0;
  for (const auto& e : j) {
    if (e["status"] == "cached") ++cached;
    if (e["status"] == "succeeded") {
      ++built;
      EXPECT_TRUE(absl::StrContains(e["installable"].get<std::string>(), "greeter")) << e.dump();
    }
  }
  EXPECT_EQ(built, 1);
  EXPECT_EQ(cached, 2);
  // An untracked file does not count (Nix would not see it either).
  WriteFileOrDie(repo.Sub("services/assets/notes.txt"), "scratch\n");
  auto fourth = build({});
  j = nlohmann::json::parse(fourth.stdout_data);
  for (const auto& e : j) EXPECT_EQ(e["status"], "cached") << e.dump();
  // A target list in a file: the same buildset machinery.
  WriteFileOrDie(
      repo.Sub("kiln.json"),
      R"({"targets": [{"flake": "services/assets"}, {"flake": "services/hello-api", "attr": "oci-image"}]})");
  auto listed = farm.Kiln({"build", "--file", repo.Sub("kiln.json"), "--json"});
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->exit.exit_code, 0) << listed->stderr_data;
  j = nlohmann::json::parse(listed->stdout_data);
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["status"], "cached") << j.dump();
  // A new service whose flake.nix git does not track yet: refused before
  // anything is uploaded, with the command that fixes it.
  WriteFileOrDie(repo.Sub("services/new/flake.nix"), ReadFileOrDie(greeter));
  auto untracked = farm.Kiln({"build", repo.Sub("services/new")});
  ASSERT_TRUE(untracked.ok());
  EXPECT_EQ(untracked->exit.exit_code, 2) << untracked->stderr_data;
  EXPECT_TRUE(absl::StrContains(untracked->stderr_data, "is not tracked by Git")) << untracked->stderr_data;
  EXPECT_TRUE(
      absl::StrContains(untracked->stderr_data, "Run: git -C '" + repo.Sub("services/new") + "' add 'flake.nix'"))
      << untracked->stderr_data;
}

// --out-link in files mode (a machine without Nix): the output comes back
// through the CAS, byte for byte what a local `nix build` of the same flake
// produces (a directory with an executable, a subdirectory and links, one
// of them absolute).
TEST_F(BuildE2eTest, OutLinkDownloadsTheSameTreeAsALocalNixBuild) {
  const std::string nonce = Nonce();
  WriteFileOrDie(work_.Sub("tree/flake.nix"),
                 // No PATH in a raw derivation (and no sandbox here): tools by path.
                 TrivialFlake("tree-output", "/bin/mkdir -p $out/bin $out/share; echo " + nonce +
                                                 " > $out/share/data; printf '#!/bin/sh\\necho hi\\n' > $out/bin/run;"
                                                 " /bin/chmod +x $out/bin/run; /bin/ln -s share/data $out/rel;"
                                                 " /bin/ln -s /bin/sh $out/abs"));
  auto r = farm_->Kiln({"build", work_.Sub("tree"), "-o", work_.Sub("result"), "--out-link-mode=files", "--json"});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->exit.exit_code, 0) << r->stderr_data;
  nlohmann::json j = nlohmann::json::parse(r->stdout_data);
  EXPECT_EQ(j[0]["outLinks"]["out"], work_.Sub("result"));
  const std::string store_path = j[0]["outputs"]["out"];
  // The same flake built by the local Nix: the same store path, the same tree.
  auto local = RunCommand({.argv = {"nix", "build", "--no-link", "--json", "path:" + work_.Sub("tree") + "#default"},
                           .extra_env = testing::NixTestEnv(),
                           .cwd = ""});
  ASSERT_TRUE(local.ok() && local->exit.Success()) << (local.ok() ? local->stderr_data : "");
  EXPECT_EQ(nlohmann::json::parse(local->stdout_data)[0]["outputs"]["out"], store_path);
  auto diff = RunCommand(
      {.argv = {"diff", "-r", "--no-dereference", store_path, work_.Sub("result")}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(diff.ok());
  EXPECT_TRUE(diff->exit.Success()) << diff->stdout_data << diff->stderr_data;
  EXPECT_EQ(fs::read_symlink(work_.Sub("result/abs")).string(), "/bin/sh");
  struct stat st;
  ASSERT_EQ(::stat(work_.Sub("result/bin/run").c_str(), &st), 0);
  EXPECT_NE(st.st_mode & 0100, 0u);

  // Again: answered from the result cache, and downloaded again.
  fs::remove_all(work_.Sub("result"));
  auto again = farm_->Kiln({"build", work_.Sub("tree"), "-o", work_.Sub("result"), "--out-link-mode=files", "--json"});
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(again->exit.exit_code, 0) << again->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(again->stdout_data)[0]["status"], "cached");
  EXPECT_EQ(ReadFileOrDie(work_.Sub("result/share/data")), nonce + "\n");
}

}  // namespace
}  // namespace kiln
