// BuildServedDerivation with the real Nix 2.8 on private stores: a client
// instantiates a derivation whose input is a source it added, and puts the
// source in a signed file:// binary cache (standing in for the farm store);
// the worker's empty store realises the input from there, builds the
// derivation through `nix-store --serve --write`, and passes the build's
// log on. An input no substituter has is a MiscFailure saying so.
#include "worker/served_derivation_build.h"

#include <gtest/gtest.h>

#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "tests/support/local_farm.h"
#include "tests/support/serve_derivation_json.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

class ServedDerivationBuildTest : public ::testing::Test {
 protected:
  CommandResult OnClient(const std::vector<std::string>& argv) {
    absl::StatusOr<CommandResult> r = RunCommand(testing::OnPrivateStore(dir_.Sub("client-nix"), argv));
    EXPECT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
    return r.ok() ? *r : CommandResult{};
  }
  std::pair<std::string, ServeDerivation> Instantiate() {
    testing::WriteFileOrDie(dir_.Sub("src/input.txt"), "an input from the client\n");
    testing::WriteFileOrDie(dir_.Sub("src/default.nix"), R"(derivation {
  name = "served-on-a-worker"; system = "x86_64-linux"; builder = "/bin/sh";
  src = ./input.txt;
  args = [ "-c" "echo building on the worker; read line < $src; { echo $line; echo $src; } > $out" ];
})");
    const std::string drv(
        absl::StripAsciiWhitespace(OnClient({"nix-instantiate", dir_.Sub("src/default.nix")}).stdout_data));
    const nlohmann::json j = nlohmann::json::parse(OnClient({"nix", "show-derivation", drv}).stdout_data)[drv];
    return {drv, testing::ServeDerivationFromJson(j)};
  }
  // The worker's Nix: a `nix-store` that runs as on the worker's machine
  // (a mount namespace with the worker's own /nix), no build users.
  ServedDerivationNix WorkerNix(const std::string& store_dir) {
    std::filesystem::create_directories(store_dir);
    const std::string wrapper = store_dir + ".nix-store";
    testing::WriteFileOrDie(
        wrapper, absl::StrCat("#!/bin/sh\nexec unshare --mount --propagation private /bin/sh -c 'mount --bind ",
                              store_dir, " /nix && nix-store --init && exec nix-store \"$@\"' sh \"$@\"\n"));
    EXPECT_EQ(::chmod(wrapper.c_str(), 0755), 0);
    ServedDerivationNix nix;
    nix.nix_store = wrapper;
    nix.options = {{"build-users-group", ""}};
    return nix;
  }

  testing::TempDir dir_;
};

TEST_F(ServedDerivationBuildTest, RealisesTheInputsThenBuildsAndPassesTheLogOn) {
  auto [drv_path, drv] = Instantiate();
  ASSERT_EQ(drv.input_srcs.size(), 1u);
  ASSERT_EQ(RunCommand({.argv = {"nix-store", "--generate-binary-cache-key", "test-cache-1", dir_.Sub("key.sec"),
                                 dir_.Sub("key.pub")},
                        .extra_env = {},
                        .cwd = ""})
                ->exit.exit_code,
            0);
  OnClient(
      {"nix", "copy", "--to", "file://" + dir_.Sub("cache") + "?secret-key=" + dir_.Sub("key.sec"), drv.input_srcs[0]});
  // The worker: an empty store of its own, the cache as its substituter.
  ServedDerivationNix nix = WorkerNix(dir_.Sub("worker-nix"));
  nix.options.push_back({"substituters", "file://" + dir_.Sub("cache")});
  nix.options.push_back(
      {"trusted-public-keys", std::string(absl::StripAsciiWhitespace(testing::ReadFileOrDie(dir_.Sub("key.pub"))))});
  std::vector<std::string> log;
  absl::StatusOr<ServeBuildResult> r =
      BuildServedDerivation(nix, drv_path, drv, ServeBuildOptions{.max_silent_time = 60, .build_timeout = 120},
                            [&](absl::string_view line) { log.emplace_back(line); });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, ServeBuildStatus::kBuilt) << r->error_msg;
  std::ifstream out(dir_.Sub("worker-nix/store/") + drv.outputs[0].path.substr(11));
  std::string line;
  std::getline(out, line);
  EXPECT_EQ(line, "an input from the client") << absl::StrJoin(log, "\n");
  bool saw = false;
  for (const std::string& l : log) saw = saw || absl::StrContains(l, "building on the worker");
  EXPECT_TRUE(saw) << "the build's log reaches the caller (" << log.size() << " lines)";
}

TEST_F(ServedDerivationBuildTest, AnInputNoSubstituterHasIsAMiscFailureSayingSo) {
  auto [drv_path, drv] = Instantiate();
  ServedDerivationNix nix = WorkerNix(dir_.Sub("empty-worker-nix"));
  nix.options.push_back({"substituters", ""});
  absl::StatusOr<ServeBuildResult> r =
      BuildServedDerivation(nix, drv_path, drv, ServeBuildOptions{}, [](absl::string_view) {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, ServeBuildStatus::kMiscFailure);
  EXPECT_TRUE(absl::StrContains(r->error_msg, "cannot be realised")) << r->error_msg;
}

}  // namespace
}  // namespace kiln
