// `kiln serve-nix` behind a real sshd as a forced command, and stock Nix on
// a store of its own as the client (ssh://root@127.0.0.1): what the farm
// built is valid there, its path infos carry the farm's signatures, and
// `nix copy --from` fetches a closure (Nix checks every NAR hash and
// signature); paths a client adds go into the farm store. What the gateway
// does not do yet (builds) is refused with its reason.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "tests/support/local_farm.h"
#include "tests/support/local_sshd.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

class ServeNixE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(farm_.Start().ok());
    testing::WriteFileOrDie(work_.Sub("svc/flake.nix"), R"({
  outputs = { self }: rec {
    packages.x86_64-linux.base = derivation {
      name = "base"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo served-over-ssh > $out" ];
    };
    packages.x86_64-linux.default = derivation {
      name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
      base = packages.x86_64-linux.base;
      args = [ "-c" "read line < $base; { echo $line top; echo $base; } > $out" ];
    };
  };
})");
    absl::StatusOr<CommandResult> built = farm_.Kiln({"build", "--json", work_.Sub("svc")});
    ASSERT_TRUE(built.ok()) << built.status();
    ASSERT_EQ(built->exit.exit_code, 0) << built->stderr_data;
    top_ = nlohmann::json::parse(built->stdout_data)[0]["outputs"]["out"].get<std::string>();
    absl::StatusOr<CommandResult> key =
        RunCommand({.argv = {testing::BinPath("kiln-coordinator"), "cache", "public-key",
                             "--state-dir=" + farm_.dir().Sub("coordinator")},
                    .extra_env = {},
                    .cwd = ""});
    ASSERT_TRUE(key.ok() && key->exit.Success());
    public_key_ = std::string(absl::StripAsciiWhitespace(key->stdout_data));
    absl::StatusOr<std::unique_ptr<testing::LocalSshd>> sshd = testing::LocalSshd::Start(
        absl::StrCat(testing::BinPath("kiln"), " serve-nix --coordinator=", farm_.coordinator_address()));
    ASSERT_TRUE(sshd.ok()) << sshd.status();
    sshd_ = *std::move(sshd);
  }

  // `argv` on a laptop with a store of its own, reaching the gateway.
  CommandResult OnLaptop(const std::string& store, std::vector<std::string> argv) {
    ProcessSpec spec = testing::OnPrivateStore(work_.Sub(store), argv);
    spec.extra_env.push_back("NIX_SSHOPTS=" + sshd_->NixSshOpts());
    absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  }

  testing::LocalFarm farm_{/*workers=*/1};
  testing::TempDir work_;
  std::string top_, public_key_;
  std::unique_ptr<testing::LocalSshd> sshd_;
};

TEST_F(ServeNixE2eTest, StockNixReadsTheFarmStoreThroughTheGateway) {
  // The closure, with hashes and the farm's signatures, as the gateway says.
  CommandResult infos = OnLaptop(
      "probe-nix", {"nix", "path-info", "--json", "--recursive", "--sigs", "--store", sshd_->StoreUri(), top_});
  ASSERT_TRUE(infos.exit.Success()) << infos.stderr_data << sshd_->LogText();
  const nlohmann::json closure = nlohmann::json::parse(infos.stdout_data);
  ASSERT_EQ(closure.size(), 2u) << infos.stdout_data;
  for (const nlohmann::json& p : closure) {
    EXPECT_TRUE(absl::StartsWith(p["narHash"].get<std::string>(), "sha256")) << p.dump();
    ASSERT_TRUE(p.contains("signatures")) << p.dump();
    EXPECT_TRUE(absl::StartsWith(p["signatures"][0].get<std::string>(), "kiln-farm-1:")) << p.dump();
  }

  // nix copy --from the gateway into an empty store, signatures checked.
  CommandResult copied = OnLaptop(
      "laptop-nix", {"nix", "copy", "--from", sshd_->StoreUri(), "--option", "trusted-public-keys", public_key_, top_});
  ASSERT_TRUE(copied.exit.Success()) << copied.stderr_data;
  CommandResult verified = OnLaptop("laptop-nix", {"nix-store", "--verify-path", top_});
  EXPECT_TRUE(verified.exit.Success()) << verified.stderr_data;
  CommandResult sigs = OnLaptop("laptop-nix", {"nix", "path-info", "--sigs", top_});
  EXPECT_TRUE(absl::StrContains(sigs.stdout_data, "kiln-farm-1:")) << sigs.stdout_data;
  std::ifstream top_file(work_.Sub("laptop-nix/store/") + std::filesystem::path(top_).filename().string());
  std::string line;
  std::getline(top_file, line);
  EXPECT_EQ(line, "served-over-ssh top");

  // Without the farm's key trusted, Nix refuses what the gateway serves.
  CommandResult distrusted = OnLaptop(
      "distrusting-nix", {"nix", "copy", "--from", sshd_->StoreUri(), "--option", "trusted-public-keys", "", top_});
  EXPECT_FALSE(distrusted.exit.Success());
  EXPECT_TRUE(absl::StrContains(distrusted.stderr_data, "signature")) << distrusted.stderr_data;
}

TEST_F(ServeNixE2eTest, StockNixAddsItsPathsToTheFarmStoreThroughTheGateway) {
  // A laptop's own build: an output referring to a source it added.
  testing::WriteFileOrDie(work_.Sub("local/local.txt"), "a laptop's source\n");
  testing::WriteFileOrDie(work_.Sub("local/default.nix"), R"(derivation {
  name = "laptop-built"; system = "x86_64-linux"; builder = "/bin/sh";
  src = ./local.txt;
  args = [ "-c" "{ cat $src; echo $src; } > $out" ];
})");
  CommandResult built = OnLaptop("uploader-nix", {"nix-build", "--no-out-link", work_.Sub("local/default.nix")});
  ASSERT_TRUE(built.exit.Success()) << built.stderr_data;
  const std::string local(absl::StripAsciiWhitespace(built.stdout_data));
  CommandResult sent = OnLaptop("uploader-nix", {"nix", "copy", "--to", sshd_->StoreUri(), local});
  ASSERT_TRUE(sent.exit.Success()) << sent.stderr_data << sshd_->LogText();
  // Now the farm's: valid through the gateway, and fetched by another
  // machine with `kiln copy`, closure and farm signature included.
  CommandResult valid = OnLaptop("probe-nix", {"nix", "path-info", "--recursive", "--store", sshd_->StoreUri(), local});
  ASSERT_TRUE(valid.exit.Success()) << valid.stderr_data;
  EXPECT_EQ(std::count(valid.stdout_data.begin(), valid.stdout_data.end(), '\n'), 2) << valid.stdout_data;
  ProcessSpec copy = testing::OnPrivateStore(work_.Sub("ci-nix"), farm_.KilnSpec({"copy", "--json", local}).argv);
  absl::StatusOr<CommandResult> copied = RunCommand(copy, "", absl::Minutes(2));
  ASSERT_TRUE(copied.ok()) << copied.status();
  ASSERT_EQ(copied->exit.exit_code, 0) << copied->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(copied->stdout_data)["fetched"], 2);
  // Sent again: the gateway says the farm has it, nothing travels.
  CommandResult again = OnLaptop("uploader-nix", {"nix", "copy", "-v", "--to", sshd_->StoreUri(), local});
  ASSERT_TRUE(again.exit.Success()) << again.stderr_data;
  EXPECT_FALSE(absl::StrContains(again.stderr_data, "copying path")) << again.stderr_data;
}

TEST_F(ServeNixE2eTest, WhatTheGatewayDoesNotDoIsRefusedWithItsReason) {
  CommandResult absent = OnLaptop("probe-nix", {"nix", "path-info", "--store", sshd_->StoreUri(),
                                                "/nix/store/00000000000000000000000000000000-absent"});
  EXPECT_FALSE(absent.exit.Success());
  EXPECT_TRUE(absl::StrContains(absent.stderr_data, "is not valid")) << absent.stderr_data;
  // Builds are not served (yet): Nix shows the gateway's reason.
  testing::WriteFileOrDie(work_.Sub("remote/default.nix"), R"(derivation {
  name = "for-the-farm"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo built remotely > $out" ];
})");
  CommandResult remote =
      OnLaptop("builder-nix", {"nix-build", "--no-out-link", "--max-jobs", "0", "--option", "builders",
                               sshd_->StoreUri() + " x86_64-linux", work_.Sub("remote/default.nix")});
  EXPECT_FALSE(remote.exit.Success());
  EXPECT_TRUE(absl::StrContains(remote.stderr_data, "does not build yet")) << remote.stderr_data;
}

}  // namespace
}  // namespace kiln
