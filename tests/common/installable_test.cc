#include "common/installable.h"

#include <gtest/gtest.h>

#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::StatusIs;
using testing::StatusOrIs;

TEST(InstallableTest, SplitsPathAndAttr) {
  auto i = ParseInstallable("./services/api#oci-image");
  ASSERT_TRUE(i.ok());
  EXPECT_EQ(i->flake_dir, "./services/api");
  EXPECT_EQ(i->attr, "oci-image");
}

TEST(InstallableTest, DefaultsLikeNix) {
  auto i = ParseInstallable("./svc");
  ASSERT_TRUE(i.ok());
  EXPECT_EQ(i->attr, "default");
  auto dot = ParseInstallable("#packages.x86_64-linux.default");
  ASSERT_TRUE(dot.ok());
  EXPECT_EQ(dot->flake_dir, ".");
  EXPECT_EQ(dot->attr, "packages.x86_64-linux.default");
  auto path = ParseInstallable("path:/srv/x#a");
  ASSERT_TRUE(path.ok());
  EXPECT_EQ(path->flake_dir, "/srv/x");
}

TEST(InstallableTest, RefusesRemoteRefsAndOptionLikeAttrs) {
  EXPECT_THAT(ParseInstallable("github:nixos/nixpkgs#hello"), StatusOrIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseInstallable("./x#--option"), StatusOrIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseInstallable("./x#a;rm -rf /"), StatusOrIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseInstallable("./x#a..b"), StatusOrIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateAttrPath("packages.x86_64-linux.hello'"), StatusIs(absl::StatusCode::kOk));
}

}  // namespace
}  // namespace kiln
