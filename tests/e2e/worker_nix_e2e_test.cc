// How the worker drives Nix, end to end with real Nix: a worker on a Nix
// store of its own (as on a real machine), so what a user did by hand on
// that machine before the farm saw a flake is really there.
//   - A directory at an output path is not an output: a failed fake-hash
//     build or an interrupted one leaves such directories, and the worker
//     asks Nix what is valid instead of looking at the file system.
//   - One target uses the whole worker: independent derivations build at
//     once, each with the worker's --cores.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

using testing::LocalFarm;
using testing::WriteFileOrDie;

using testing::kFakeSha256Sri;
using testing::Sha256SriOf;

// A flake with a recursive FOD `deps` (a directory holding `lock`, like
// `bun install` output) and a default package that reads it.
std::string DepsFlake(const std::string& name, const std::string& hash, const std::string& script) {
  return absl::StrReplaceAll(R"({
  outputs = { self }: let
    deps = derivation {
      name = "NAME"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo fetching NAME; SCRIPT" ];
      outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "HASH";
    };
  in {
    packages.x86_64-linux.deps = deps;
    packages.x86_64-linux.default = derivation {
      name = "NAME-app"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "/bin/cat ${deps}/lock > $out" ];
    };
  };
})",
                             {{"NAME", name}, {"HASH", hash}, {"SCRIPT", script}});
}

// A flake whose default package is a flat FOD copying lock.txt to $out.
std::string FlatFodFlake(const std::string& name, const std::string& hash) {
  return absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "NAME"; system = "x86_64-linux"; builder = "/bin/sh";
      lock = ./lock.txt;
      args = [ "-c" "echo fetching NAME; /bin/cat $lock > $out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "HASH";
    };
  };
})",
                             {{"NAME", name}, {"HASH", hash}});
}

class WorkerNixE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    farm_ = new LocalFarm(/*workers=*/1, /*max_jobs_per_worker=*/4);
    farm_->UsePrivateStores();
    farm_->SetWorkerFlags({"--cores=3"});
    absl::Status started = farm_->Start();
    ASSERT_TRUE(started.ok()) << started;
  }
  static void TearDownTestSuite() {
    delete farm_;
    farm_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(farm_, nullptr);
    name_ = absl::StrCat("deps-", absl::ToUnixNanos(absl::Now()));
  }

  std::string Svc() const { return work_.Sub("svc"); }

  // `argv` on the worker's machine (its store); exit status and output.
  CommandResult OnWorker(const std::vector<std::string>& argv) {
    auto r = RunCommand(farm_->OnWorkerMachine(0, argv), "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  }

  // The output path of `attr` (evaluation only: the same on every store).
  std::string OutPath(const std::string& attr) {
    ProcessSpec eval;
    eval.argv = {"nix", "eval", "--raw", absl::StrCat("path:", Svc(), "#", attr, ".outPath")};
    eval.extra_env = testing::NixTestEnv();
    auto r = RunCommand(eval);
    EXPECT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
    return r.ok() ? r->stdout_data : "";
  }

  // Where the worker's store keeps `store_path` on this host.
  std::string OnHost(const std::string& store_path) {
    return absl::StrCat(farm_->StoreDirOf(0), "/store/", std::filesystem::path(store_path).filename().string());
  }

  bool ValidOnWorker(const std::string& store_path) {
    CommandResult r = OnWorker({"nix-store", "--check-validity", "--print-invalid", store_path});
    EXPECT_TRUE(r.exit.Success()) << r.stderr_data;
    return r.exit.Success() && absl::StripAsciiWhitespace(r.stdout_data).empty();
  }

  // `kiln build --json` of the flake's default package, as ReadJsonBuild
  // reads it.
  using Build = testing::JsonBuildOutput;
  Build KilnBuild() {
    auto r = farm_->Kiln({"build", Svc(), "--json"});
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? testing::ReadJsonBuild(*r) : Build{};
  }

  static LocalFarm* farm_;
  testing::TempDir work_;
  std::string name_;
};
LocalFarm* WorkerNixE2eTest::farm_ = nullptr;

TEST_F(WorkerNixE2eTest, FodHashWorksOnAWorkerWhereAFakeHashWasBuiltByHand) {
  const std::string script = "/bin/mkdir $out; echo go.sum-v1 > $out/lock";
  WriteFileOrDie(work_.Sub("svc/flake.nix"), DepsFlake(name_, kFakeSha256Sri, script));
  // The right hash, by Nix alone: the same directory made here.
  WriteFileOrDie(work_.Sub("expected/lock"), "go.sum-v1\n");
  ProcessSpec hash;
  hash.argv = {"nix", "hash", "path", work_.Sub("expected")};
  hash.extra_env = testing::NixTestEnv();
  auto hashed = RunCommand(hash);
  ASSERT_TRUE(hashed.ok() && hashed->exit.Success()) << (hashed.ok() ? hashed->stderr_data : "");
  const std::string right(absl::StripAsciiWhitespace(hashed->stdout_data));

  // The SOP's first step on the worker's machine, twice (say, once more to
  // copy the hash): a plain `nix build` of the fake hash fails. The first
  // run keeps the output under the hash it has; the second cannot, and
  // leaves a directory at the fake hash's output path that Nix does not
  // count as valid.
  for (int run = 0; run < 2; ++run) {
    CommandResult by_hand = OnWorker({"nix", "build", "--no-link", absl::StrCat("path:", Svc(), "#deps")});
    ASSERT_FALSE(by_hand.exit.Success());
    ASSERT_TRUE(absl::StrContains(by_hand.stderr_data, right)) << by_hand.stderr_data;
  }
  const std::string leftover = OutPath("deps");
  ASSERT_TRUE(std::filesystem::exists(OnHost(leftover))) << "Nix no longer leaves " << leftover;
  ASSERT_FALSE(ValidOnWorker(leftover));

  auto found = farm_->Kiln({"fod-hash", absl::StrCat(Svc(), "#default"), "--json"});
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_FALSE(absl::StrContains(found->stderr_data, "not valid")) << found->stderr_data;
  auto out = nlohmann::json::parse(found->stdout_data, nullptr, false);
  ASSERT_TRUE(out.is_object()) << found->stdout_data << found->stderr_data;
  ASSERT_EQ(out["fods"].size(), 1u) << out.dump();
  EXPECT_EQ(out["fods"][0].value("status", ""), "fake") << out.dump() << found->stderr_data;
  EXPECT_EQ(out["fods"][0].value("correct", ""), right) << out.dump();

  // With that hash the build succeeds on the same worker.
  WriteFileOrDie(work_.Sub("svc/flake.nix"), DepsFlake(name_, right, script));
  Build fixed = KilnBuild();
  EXPECT_EQ(fixed.exit_code, 0) << fixed.printed << fixed.entry.dump();
}

TEST_F(WorkerNixE2eTest, FodHashSaysWhyAFodFailedInOneLine) {
  WriteFileOrDie(work_.Sub("svc/flake.nix"),
                 DepsFlake(name_, kFakeSha256Sri, "echo registry.example: no such host >&2; exit 7"));
  auto found = farm_->Kiln({"fod-hash", absl::StrCat(Svc(), "#default")});
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ(found->exit.exit_code, 1) << found->stderr_data;
  std::vector<std::string> errors;
  for (absl::string_view line : absl::StrSplit(found->stderr_data, '\n')) {
    if (absl::StartsWith(line, "error: FOD")) errors.emplace_back(line);
  }
  ASSERT_EQ(errors.size(), 1u) << found->stderr_data;
  EXPECT_TRUE(
      absl::StartsWith(errors[0], absl::StrCat("error: FOD '", name_, "' could not be computed: builder for '")))
      << errors[0];
  EXPECT_TRUE(absl::StrContains(errors[0], "failed with exit code 7")) << errors[0];
  EXPECT_FALSE(absl::StrContains(errors[0], "error: error:")) << errors[0];
  EXPECT_TRUE(absl::StrContains(found->stdout_data, "failed")) << found->stdout_data;
}

TEST_F(WorkerNixE2eTest, ASuspectStaleFodWithALeftoverAtItsPathIsBuiltAndChecked) {
  const std::string v1 = "left-pad@1.3.0\n";
  const std::string v2 = "left-pad@1.3.1\n";
  WriteFileOrDie(work_.Sub("svc/lock.txt"), v1);
  WriteFileOrDie(work_.Sub("svc/flake.nix"), FlatFodFlake(name_, Sha256SriOf(v1)));
  Build first = KilnBuild();
  ASSERT_EQ(first.exit_code, 0) << first.printed;  // The cache knows the hash for v1's inputs.

  // The output goes from the worker's store, and an interrupted build's
  // partial file takes its place.
  const std::string out = OutPath("default");
  CommandResult deleted = OnWorker({"nix", "store", "delete", out});
  ASSERT_TRUE(deleted.exit.Success()) << deleted.stderr_data;
  WriteFileOrDie(OnHost(out), "left-pad@1.3");
  ASSERT_FALSE(ValidOnWorker(out));

  // New inputs under the old hash: suspect. The farm store still has the
  // old output under that hash, and the worker's Nix substitutes it; the
  // substituted output is rebuilt, which fails with the right hash.
  WriteFileOrDie(work_.Sub("svc/lock.txt"), v2);
  Build stale = KilnBuild();
  EXPECT_EQ(stale.exit_code, 1) << stale.printed;
  EXPECT_FALSE(absl::StrContains(stale.printed, "not valid")) << stale.printed;
  const auto& mismatches = stale.entry.value("hashMismatches", nlohmann::json::array());
  ASSERT_EQ(mismatches.size(), 1u) << stale.entry.dump() << stale.printed;
  EXPECT_EQ(mismatches[0].value("got", ""), Sha256SriOf(v2));
  EXPECT_EQ(mismatches[0].value("source", ""), "check");
}

TEST_F(WorkerNixE2eTest, OneTargetBuildsItsIndependentDerivationsAtOnceWithTheWorkersCores) {
  WriteFileOrDie(work_.Sub("svc/flake.nix"), absl::StrReplaceAll(R"({
  outputs = { self }: let
    leaf = n: derivation {
      name = "NAME-${n}"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo start ${n} cores $NIX_BUILD_CORES; /bin/sleep 3; echo end ${n}; echo ${n} > $out" ];
    };
    a = leaf "a";
    b = leaf "b";
  in {
    packages.x86_64-linux.default = derivation {
      name = "NAME-top"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "/bin/cat ${a} ${b} > $out" ];
    };
  };
})",
                                                                 {{"NAME", name_}}));
  Build built = KilnBuild();
  ASSERT_EQ(built.exit_code, 0) << built.printed;
  // In the order the worker's Nix printed them: both started before either
  // ended (one at a time, each would end before the other starts).
  std::vector<std::string> lines = absl::StrSplit(built.printed, '\n');
  auto at = [&](const std::string& prefix) {
    auto it =
        std::find_if(lines.begin(), lines.end(), [&](const std::string& l) { return absl::StartsWith(l, prefix); });
    EXPECT_NE(it, lines.end()) << prefix << " missing in:\n" << built.printed;
    return it - lines.begin();
  };
  EXPECT_LT(std::max(at("start a"), at("start b")), std::min(at("end a"), at("end b"))) << built.printed;
  EXPECT_TRUE(absl::StrContains(built.printed, "start a cores 3")) << built.printed;
  EXPECT_TRUE(absl::StrContains(built.printed, "start b cores 3")) << built.printed;
}

}  // namespace
}  // namespace kiln
