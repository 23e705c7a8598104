// Asking Nix which store paths are valid: the parsing of its answer, and
// the real local Nix (a path it was given is valid, a name it never heard of
// is not).
#include "common/nix_store_validity.h"

#include <gtest/gtest.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

TEST(NixStoreValidityTest, FindsNixStoreBesideNix) {
  EXPECT_EQ(NixStoreBinaryBeside("nix"), "nix-store");
  EXPECT_EQ(NixStoreBinaryBeside("/usr/bin/nix"), "/usr/bin/nix-store");
  EXPECT_EQ(NixStoreBinaryBeside("/opt/nix/bin/nix"), "/opt/nix/bin/nix-store");
}

TEST(NixStoreValidityTest, TheValidPathsAreThoseNotListedInvalid) {
  const std::vector<std::string> asked = {"/nix/store/a-x", "/nix/store/b-y", "/nix/store/c-z"};
  auto valid = ValidPathsFromInvalidList(asked, "/nix/store/b-y\n");
  ASSERT_TRUE(valid.ok()) << valid.status();
  EXPECT_EQ(*valid, (absl::flat_hash_set<std::string>{"/nix/store/a-x", "/nix/store/c-z"}));
  valid = ValidPathsFromInvalidList(asked, "");
  ASSERT_TRUE(valid.ok());
  EXPECT_EQ(valid->size(), 3u);
  // A path it was not asked about means the answer cannot be trusted.
  EXPECT_FALSE(ValidPathsFromInvalidList(asked, "/nix/store/d-w\n").ok());
}

TEST(NixStoreValidityTest, AsksTheRealNix) {
  testing::TempDir dir;
  const std::string file = dir.Sub(absl::StrCat("kiln-validity-", absl::ToUnixNanos(absl::Now())));
  testing::WriteFileOrDie(file, "held\n");
  ProcessSpec add;
  add.argv = {"nix-store", "--add", file};
  auto added = RunCommand(add);
  ASSERT_TRUE(added.ok() && added->exit.Success()) << (added.ok() ? added->stderr_data : added.status().ToString());
  const std::string held(absl::StripAsciiWhitespace(added->stdout_data));
  // A well-formed store path nothing ever registered.
  const std::string never = "/nix/store/00000000000000000000000000000000-kiln-never-built";
  auto valid = QueryValidPaths("nix-store", {}, {held, never});
  ASSERT_TRUE(valid.ok()) << valid.status();
  EXPECT_EQ(*valid, absl::flat_hash_set<std::string>{held});
  EXPECT_TRUE(QueryValidPaths("nix-store", {}, {})->empty());

  // Trouble is an error that says so, never "nothing is valid".
  auto outside = QueryValidPaths("nix-store", {}, {"/etc/passwd"});
  ASSERT_FALSE(outside.ok());
  EXPECT_NE(outside.status().message().find("nix-store --check-validity failed"), std::string::npos)
      << outside.status();
  auto missing = QueryValidPaths(dir.Sub("no-such-nix-store"), {}, {held});
  ASSERT_FALSE(missing.ok());
}

}  // namespace
}  // namespace kiln
