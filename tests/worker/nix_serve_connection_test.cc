// The worker's long-lived `nix-store --serve` against the real Nix: the
// closure and path infos it gives are what `nix path-info --json
// --recursive` says, a path that is not valid is NOT_FOUND, and the
// connection answers again after that (a new child).
#include "worker/nix_serve_connection.h"

#include <gtest/gtest.h>

#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/nix_hash.h"
#include "common/subprocess.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"
#include "worker/local_store.h"

namespace kiln {
namespace {

std::string RunNix(const std::vector<std::string>& argv) {
  ProcessSpec spec;
  spec.argv = argv;
  spec.extra_env = testing::NixTestEnv();
  auto r = RunCommand(spec, "", absl::Minutes(2));
  EXPECT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
  return r.ok() ? std::string(absl::StripAsciiWhitespace(r->stdout_data)) : "";
}

TEST(NixServeConnectionTest, GivesWhatNixPathInfoSays) {
  testing::TempDir dir;
  const std::string nonce = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  testing::WriteFileOrDie(dir.Sub("c.nix"), absl::StrCat(R"(
let a = derivation { name = "serve-a-)",
                                                         nonce, R"("; system = "x86_64-linux"; builder = "/bin/sh";
                     args = [ "-c" "echo a > $out" ]; };
in derivation { name = "serve-b-)",
                                                         nonce, R"("; system = "x86_64-linux"; builder = "/bin/sh";
                args = [ "-c" "echo ${a} > $out" ]; })"));
  const std::string b = RunNix({"nix-build", "--no-out-link", dir.Sub("c.nix")});
  ASSERT_FALSE(b.empty());
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> expected = ParsePathInfoJson(
      RunNix({"nix", "--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive", b}));
  ASSERT_TRUE(expected.ok()) << expected.status();
  ASSERT_EQ(expected->size(), 2u);

  NixServeConnection serve("nix-store", {});
  for (int round = 0; round < 2; ++round) {  // The same child answers twice.
    absl::StatusOr<std::vector<kiln::v1::PathInfo>> got = serve.ClosureInfos({b});
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->size(), 2u);
    std::map<std::string, kiln::v1::PathInfo> by_path;
    for (const auto& info : *got) by_path[info.store_path()] = info;
    for (const kiln::v1::PathInfo& want : *expected) {
      ASSERT_TRUE(by_path.contains(want.store_path())) << want.store_path();
      const kiln::v1::PathInfo& have = by_path[want.store_path()];
      EXPECT_EQ(have.nar_size(), want.nar_size());
      absl::StatusOr<NixHash> h1 = ParseNixHash(have.nar_hash()), h2 = ParseNixHash(want.nar_hash());
      ASSERT_TRUE(h1.ok() && h2.ok()) << have.nar_hash() << " / " << want.nar_hash();
      EXPECT_EQ(h1->bytes, h2->bytes);
      EXPECT_EQ(std::vector<std::string>(have.references().begin(), have.references().end()),
                std::vector<std::string>(want.references().begin(), want.references().end()));
      EXPECT_EQ(have.deriver(), want.deriver());
    }
  }
  // Not valid: NOT_FOUND or an error; then it answers again.
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> absent =
      serve.ClosureInfos({"/nix/store/00000000000000000000000000000000-absent"});
  EXPECT_FALSE(absent.ok());
  EXPECT_TRUE(serve.ClosureInfos({b}).ok());
  // NixLocalStore gives the same through it.
  NixLocalStore local("nix", {});
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> through = local.ClosureInfos({b});
  ASSERT_TRUE(through.ok()) << through.status();
  EXPECT_EQ(through->size(), 2u);
  EXPECT_FALSE(local.ClosureInfos({"/nix/store/00000000000000000000000000000000-absent"}).ok());
}

}  // namespace
}  // namespace kiln
