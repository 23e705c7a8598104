// The FOD hash cache end to end: a real coordinator, two real workers
// (labelled so a job can be sent to either), real Nix. The FOD under test
// copies a lockfile (and an env var) to $out, so its right hash is computed
// here independently of Kiln. Each worker has a Nix store of its own: the
// one "holding the old output" is the one that built it.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "kiln/v1/fod.grpc.pb.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

using testing::LocalFarm;
using testing::WriteFileOrDie;

using testing::kFakeSha256Sri;
using testing::Sha256SriOf;

// A flake whose default package is a FOD: it prints "fetching NAME" (so a
// log shows whether it ran), then writes lock.txt and $EXTRA to $out.
std::string FodFlake(const std::string& name, const std::string& hash, const std::string& extra,
                     const std::string& script = "/bin/cat $lock > $out; echo \\\"$EXTRA\\\" >> $out") {
  return absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "NAME"; system = "x86_64-linux"; builder = "/bin/sh";
      lock = ./lock.txt;
      EXTRA = "EXTRAVALUE";
      args = [ "-c" "echo fetching NAME; SCRIPT" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "HASH";
    };
  };
})",
                             {{"NAME", name}, {"HASH", hash}, {"EXTRAVALUE", extra}, {"SCRIPT", script}});
}

class FodE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    farm_ = new LocalFarm(/*workers=*/0, /*max_jobs_per_worker=*/2);
    farm_->UsePrivateStores();  // Two workers, each its own machine.
    absl::Status started = farm_->Start();
    ASSERT_TRUE(started.ok()) << started;
    farm_->SetWorkerFlags({"--labels=node=a"});
    ASSERT_TRUE(farm_->AddWorker().ok());
    farm_->SetWorkerFlags({"--labels=node=b"});
    ASSERT_TRUE(farm_->AddWorker().ok());
  }
  static void TearDownTestSuite() {
    delete farm_;
    farm_ = nullptr;
  }

  void SetUp() override { name_ = absl::StrCat("deps-", absl::ToUnixNanos(absl::Now())); }

  void Write(const std::string& hash, const std::string& lock, const std::string& extra = "one") {
    WriteFileOrDie(work_.Sub("svc/lock.txt"), lock);
    WriteFileOrDie(work_.Sub("svc/flake.nix"), FodFlake(name_, hash, extra));
  }

  // `kiln build --json` on worker `node`, as ReadJsonBuild reads it.
  using Build = testing::JsonBuildOutput;
  Build Run(const std::string& node) {
    auto r = farm_->Kiln({"build", work_.Sub("svc"), "--json", "--label=node=" + node});
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? testing::ReadJsonBuild(*r) : Build{};
  }
  static nlohmann::json Mismatch(const Build& b) {
    const auto& list = b.entry.value("hashMismatches", nlohmann::json::array());
    return list.size() == 1 ? list[0] : nlohmann::json();
  }

  kiln::v1::ListFodsResponse ListFods() {
    auto stub = kiln::v1::FodService::NewStub(MakeChannel(farm_->coordinator_address()));
    grpc::ClientContext context;
    kiln::v1::ListFodsRequest request;
    kiln::v1::ListFodsResponse response;
    EXPECT_TRUE(stub->ListFods(&context, request, &response).ok());
    return response;
  }

  static LocalFarm* farm_;
  testing::TempDir work_;
  std::string name_;
};
LocalFarm* FodE2eTest::farm_ = nullptr;

TEST_F(FodE2eTest, AFakeHashIsComputedOnceThenCaughtEverywhereBeforeTheFodRuns) {
  const std::string lock = "left-pad@1.3.0\n";
  const std::string right = Sha256SriOf(lock + "one\n");

  Write(kFakeSha256Sri, lock);  // lib.fakeHash
  Build first = Run("a");
  EXPECT_EQ(first.exit_code, 1) << first.printed;
  EXPECT_TRUE(absl::StrContains(first.printed, "fetching " + name_)) << first.printed;
  nlohmann::json m = Mismatch(first);
  EXPECT_EQ(m.value("got", ""), right) << first.entry.dump();
  EXPECT_EQ(m.value("source", ""), "build");
  EXPECT_EQ(m.value("name", ""), name_);

  // The other worker, `outputHash = ""` this time (another .drv, the same
  // key): fails at once with the right hash, and the FOD never runs.
  Write("", lock);
  Build second = Run("b");
  EXPECT_EQ(second.exit_code, 1) << second.printed;
  EXPECT_FALSE(absl::StrContains(second.printed, "fetching " + name_)) << second.printed;
  EXPECT_EQ(second.entry.value("worker", ""), "worker-2");
  m = Mismatch(second);
  EXPECT_EQ(m.value("got", ""), right) << second.entry.dump();
  EXPECT_EQ(m.value("specified", ""), kFakeSha256Sri);
  EXPECT_EQ(m.value("source", ""), "cache");
  EXPECT_EQ(m.value("computedByWorker", ""), "worker-1");
  EXPECT_TRUE(absl::StrContains(second.printed, absl::StrCat("set outputHash = \"", right, "\""))) << second.printed;

  // The cache outlives a coordinator crash.
  farm_->KillCoordinator(SIGKILL);
  ASSERT_TRUE(farm_->RestartCoordinator().ok());
  Build after_restart = Run("a");
  EXPECT_EQ(Mismatch(after_restart).value("source", ""), "cache") << after_restart.printed;

  // A new lockfile under the fake hash: new inputs, a new key, computed again.
  Write(kFakeSha256Sri, "left-pad@2.0.0\n");
  Build relocked = Run("b");
  EXPECT_TRUE(absl::StrContains(relocked.printed, "fetching " + name_)) << relocked.printed;
  EXPECT_EQ(Mismatch(relocked).value("source", ""), "build") << relocked.entry.dump();
  EXPECT_EQ(Mismatch(relocked).value("got", ""), Sha256SriOf("left-pad@2.0.0\none\n"));

  // With the right hash it builds.
  Write(right, lock);
  Build fixed = Run("b");
  EXPECT_EQ(fixed.exit_code, 0) << fixed.printed;

  auto metrics = testing::ScrapeMetrics(farm_->coordinator_metrics());
  ASSERT_TRUE(metrics.ok());
  EXPECT_TRUE(absl::StrContains(*metrics, "kiln_fod_lookups_total{result=\"stale_caught\"} 1")) << *metrics;
  EXPECT_TRUE(absl::StrContains(*metrics, "kiln_fod_builds_avoided_total 1")) << *metrics;
}

TEST_F(FodE2eTest, ALockfileChangeWithAnUnchangedHashIsCaughtWhereNixWouldReuseTheOldOutput) {
  const std::string v1 = "left-pad@1.3.0\n";
  const std::string v2 = "left-pad@1.3.1\n";
  Write(Sha256SriOf(v1 + "one\n"), v1);
  Build built = Run("a");
  ASSERT_EQ(built.exit_code, 0) << built.printed;  // Verified and held in the store.

  // The lockfile changes, the hash does not: Nix alone, on the machine that
  // built it, reuses the old output (its path depends only on name and
  // hash) and succeeds.
  Write(Sha256SriOf(v1 + "one\n"), v2);
  auto nix = RunCommand(farm_->OnWorkerMachine(0, {"nix", "build", "--no-link", "path:" + work_.Sub("svc")}));
  ASSERT_TRUE(nix.ok());
  EXPECT_EQ(nix->exit.exit_code, 0) << nix->stderr_data;
  EXPECT_FALSE(absl::StrContains(nix->stderr_data, "fetching")) << nix->stderr_data;

  // Kiln, there, rebuilds the suspect output and fails with the new hash.
  Build stale = Run("a");
  EXPECT_EQ(stale.exit_code, 1) << stale.printed;
  nlohmann::json m = Mismatch(stale);
  EXPECT_EQ(m.value("source", ""), "check") << stale.entry.dump();
  EXPECT_EQ(m.value("got", ""), Sha256SriOf(v2 + "one\n"));
  EXPECT_TRUE(absl::StrContains(stale.printed, "was computed for other inputs")) << stale.printed;

  // From now on the new inputs' hash is known: caught without building,
  // on the other machine too.
  Build again = Run("b");
  EXPECT_EQ(Mismatch(again).value("source", ""), "cache") << again.printed;
  EXPECT_FALSE(absl::StrContains(again.printed, "fetching " + name_)) << again.printed;
}

TEST_F(FodE2eTest, AnEnvVarChangeWithAnUnchangedHashIsCaughtToo) {
  const std::string lock = "go.sum v1\n";
  Write(Sha256SriOf(lock + "one\n"), lock, "one");
  ASSERT_EQ(Run("a").exit_code, 0);
  Write(Sha256SriOf(lock + "one\n"), lock, "two");
  Build stale = Run("b");
  EXPECT_EQ(stale.exit_code, 1) << stale.printed;
  EXPECT_EQ(Mismatch(stale).value("got", ""), Sha256SriOf(lock + "two\n")) << stale.entry.dump();
  // An input change that does not change the output passes the check.
  WriteFileOrDie(work_.Sub("svc/flake.nix"),
                 FodFlake(name_, Sha256SriOf(lock + "one\n"), "three", "/bin/cat $lock > $out; echo one >> $out"));
  Build same = Run("a");
  EXPECT_EQ(same.exit_code, 0) << same.printed;
}

TEST_F(FodE2eTest, AFodThatDiffersBetweenBuildsIsMarkedNondeterministicAndNeverFailedEarly) {
  const std::string stamp = "/bin/cat /proc/sys/kernel/random/uuid > $out";
  WriteFileOrDie(work_.Sub("svc/lock.txt"), "unused\n");
  WriteFileOrDie(work_.Sub("svc/flake.nix"), FodFlake(name_, kFakeSha256Sri, "one", stamp));
  Build first = Run("a");
  const std::string got = Mismatch(first).value("got", "");
  ASSERT_FALSE(got.empty()) << first.printed;
  WriteFileOrDie(work_.Sub("svc/flake.nix"), FodFlake(name_, got, "one", stamp));
  // Nix keeps a mismatched output under the hash it really has, so on this
  // machine the next build would just find it. A worker with a fresh store
  // would not: delete it, as if the job went to one.
  ProcessSpec eval;
  eval.argv = {"nix", "eval", "--raw", "path:" + work_.Sub("svc") + "#default.outPath"};
  eval.extra_env = testing::NixTestEnv();
  auto out_path = RunCommand(eval);
  ASSERT_TRUE(out_path.ok() && out_path->exit.Success()) << (out_path.ok() ? out_path->stderr_data : "");
  ProcessSpec del;
  del.argv = {"nix", "store", "delete", out_path->stdout_data};
  del.extra_env = testing::NixTestEnv();
  auto deleted = RunCommand(del);
  ASSERT_TRUE(deleted.ok() && deleted->exit.Success()) << (deleted.ok() ? deleted->stderr_data : "");
  Build second = Run("b");
  EXPECT_EQ(second.exit_code, 1) << second.printed;  // Another uuid.
  EXPECT_EQ(Mismatch(second).value("source", ""), "build");

  bool marked = false;
  const kiln::v1::ListFodsResponse listed = ListFods();
  for (const auto& e : listed.entries()) {
    if (e.name() != name_) continue;
    marked = e.nondeterministic();
    EXPECT_EQ(e.hash(), got);
    EXPECT_FALSE(e.other_hash().empty());
  }
  EXPECT_TRUE(marked);
  // A fake hash of it is not failed from the cache: the FOD runs.
  WriteFileOrDie(work_.Sub("svc/flake.nix"), FodFlake(name_, kFakeSha256Sri, "one", stamp));
  Build third = Run("a");
  EXPECT_EQ(Mismatch(third).value("source", ""), "build") << third.printed;
  EXPECT_TRUE(absl::StrContains(third.printed, "fetching " + name_)) << third.printed;
}

// Three FODs, each declared with a fake hash in another spelling, under a
// package that needs all three.
std::string ThreeFodFlake(const std::string& n) {
  const std::string zeros = kFakeSha256Sri;
  return absl::StrReplaceAll(R"({
  outputs = { self }: let
    system = "x86_64-linux";
    bun = derivation {
      name = "bun-deps-N";
      inherit system; builder = "/bin/sh"; args = [ "-c" "echo fetching bun; echo bun > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256";
      outputHash = "";
    };
    go = derivation {
      name = "go-modules-N";
      inherit system; builder = "/bin/sh"; args = [ "-c" "echo fetching go; echo go > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256";
      outputHash = "ZEROS";
    };
    hugo = derivation {
      name = "hugo-modules-N";
      inherit system; builder = "/bin/sh"; args = [ "-c" "echo fetching hugo; echo hugo > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256";
      outputHash = "";
    };
  in {
    packages.${system}.default = derivation {
      name = "site-N"; inherit system; builder = "/bin/sh";
      args = [ "-c" "/bin/cat ${bun} ${go} ${hugo} > $out" ];
    };
  };
})",
                             {{"-N", "-" + n}, {"ZEROS", zeros}});
}

TEST_F(FodE2eTest, FodHashComputesEveryFakeHashInOneCommandAndWriteMakesTheFlakeBuild) {
  const std::string n = name_.substr(5);
  WriteFileOrDie(work_.Sub("site/flake.nix"), ThreeFodFlake(n));
  auto r = farm_->Kiln({"fod-hash", work_.Sub("site"), "--json"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit.exit_code, 1) << r->stderr_data;  // Hashes to change, not written.
  auto j = nlohmann::json::parse(r->stdout_data, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r->stdout_data << r->stderr_data;
  ASSERT_EQ(j["fods"].size(), 3u) << j.dump();
  std::set<std::string> jobs;
  for (const auto& f : j["fods"]) {
    const std::string fod_name = f.value("name", "");
    const std::string content = fod_name.substr(0, fod_name.find('-'));
    EXPECT_EQ(f.value("status", ""), "fake") << f.dump();
    EXPECT_EQ(f.value("correct", ""), Sha256SriOf(content + "\n")) << f.dump();
    EXPECT_EQ(f.value("source", ""), "computed");
    jobs.insert(f.value("computedByJob", ""));
  }
  EXPECT_EQ(jobs.size(), 3u);  // One job per FOD, spread by the scheduler.
  EXPECT_EQ(j["edits"].size(), 3u) << j.dump();
  EXPECT_TRUE(j["leftToDo"].empty()) << j.dump();

  // --write: the three edits, then the flake builds.
  auto written = farm_->Kiln({"fod-hash", work_.Sub("site"), "--write"});
  ASSERT_TRUE(written.ok());
  EXPECT_EQ(written->exit.exit_code, 0) << written->stdout_data << written->stderr_data;
  EXPECT_TRUE(absl::StrContains(written->stdout_data, "edited flake.nix:8:")) << written->stdout_data;
  EXPECT_TRUE(absl::StrContains(written->stdout_data, "(cached: job")) << written->stdout_data;
  const std::string flake = testing::ReadFileOrDie(work_.Sub("site/flake.nix"));
  for (const char* content : {"bun", "go", "hugo"}) {
    EXPECT_TRUE(absl::StrContains(flake, Sha256SriOf(std::string(content) + "\n"))) << flake;
  }
  auto built = farm_->Kiln({"build", work_.Sub("site")});
  ASSERT_TRUE(built.ok());
  EXPECT_EQ(built->exit.exit_code, 0) << built->stderr_data;
  auto again = farm_->Kiln({"fod-hash", work_.Sub("site")});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->exit.exit_code, 0) << again->stdout_data << again->stderr_data;
  EXPECT_EQ(std::count(again->stdout_data.begin(), again->stdout_data.end(), '\n'), 3) << again->stdout_data;
  EXPECT_TRUE(absl::StrContains(again->stdout_data, "right")) << again->stdout_data;
}

TEST_F(FodE2eTest, OneBuildReportsEveryMismatchOfTheClosure) {
  WriteFileOrDie(work_.Sub("site/flake.nix"), ThreeFodFlake(name_.substr(5) + "kg"));
  auto r = farm_->Kiln({"build", work_.Sub("site"), "--json"});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->exit.exit_code, 1);
  auto j = nlohmann::json::parse(r->stdout_data, nullptr, false);
  ASSERT_TRUE(j.is_array() && j.size() == 1) << r->stdout_data << r->stderr_data;
  ASSERT_EQ(j[0]["hashMismatches"].size(), 3u) << j.dump();  // --keep-going: all three in one run.
  for (const auto& m : j[0]["hashMismatches"]) EXPECT_EQ(m.value("source", ""), "build");
}

TEST_F(FodE2eTest, AFodFedTheWholeFlakeSourceIsPointedOut) {
  WriteFileOrDie(work_.Sub("svc/flake.nix"), absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "NAME"; system = "x86_64-linux"; builder = "/bin/sh";
      src = ./.;
      args = [ "-c" "/bin/cat $src/lock.txt > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "";
    };
  };
})",
                                                                 {{"NAME", name_}}));
  WriteFileOrDie(work_.Sub("svc/lock.txt"), "whole\n");
  Build b = Run("a");
  EXPECT_TRUE(absl::StrContains(b.printed, "takes the whole flake source as an input")) << b.printed;
}

TEST_F(FodE2eTest, TheCacheIsListedExportedForgottenAndImported) {
  const std::string lock = "admin\n";
  Write(kFakeSha256Sri, lock);
  ASSERT_EQ(Run("a").exit_code, 1);  // Computes and records it.
  auto listed = farm_->Kiln({"fod", "list", "--name=" + name_});
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->exit.exit_code, 0) << listed->stderr_data;
  EXPECT_TRUE(absl::StrContains(listed->stdout_data, Sha256SriOf(lock + "one\n"))) << listed->stdout_data;
  const std::string key_prefix = listed->stdout_data.substr(0, 12);

  auto shown = farm_->Kiln({"fod", "show", key_prefix});
  ASSERT_TRUE(shown.ok());
  EXPECT_TRUE(absl::StrContains(shown->stdout_data, "worker-1")) << shown->stdout_data;

  auto exported = farm_->Kiln({"fod", "export", "--name=" + name_});
  ASSERT_TRUE(exported.ok());
  WriteFileOrDie(work_.Sub("fods.jsonl"), exported->stdout_data);
  auto forgot = farm_->Kiln({"fod", "forget", key_prefix});
  ASSERT_TRUE(forgot.ok());
  EXPECT_TRUE(absl::StrContains(forgot->stdout_data, "forgot 1")) << forgot->stdout_data << forgot->stderr_data;
  Build unknown = Run("b");  // Not known any more: the FOD runs again.
  EXPECT_EQ(Mismatch(unknown).value("source", ""), "build") << unknown.printed;
  auto forgot_again = farm_->Kiln({"fod", "forget", key_prefix});
  ASSERT_TRUE(forgot_again.ok());
  ASSERT_EQ(forgot_again->exit.exit_code, 0);

  auto imported = farm_->Kiln({"fod", "import", work_.Sub("fods.jsonl")});
  ASSERT_TRUE(imported.ok());
  EXPECT_TRUE(absl::StrContains(imported->stdout_data, "imported 1")) << imported->stdout_data << imported->stderr_data;
  EXPECT_EQ(Mismatch(Run("a")).value("source", ""), "cache");
}

}  // namespace
}  // namespace kiln
