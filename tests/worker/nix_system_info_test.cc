#include "worker/nix_system_info.h"

#include <gtest/gtest.h>

namespace kiln {
namespace {

TEST(NixSystemInfoTest, ParsesShowConfig) {
  auto info = ParseNixShowConfig(
      "sandbox = false\nsystem = x86_64-linux\nextra-platforms = i686-linux x86_64-linux\n"
      "system-features = benchmark big-parallel kvm nixos-test\n");
  EXPECT_EQ(info.systems, (std::vector<std::string>{"x86_64-linux", "i686-linux"}));
  EXPECT_EQ(info.features, (std::vector<std::string>{"benchmark", "big-parallel", "kvm", "nixos-test"}));
}

// The real local Nix answers with at least its own system.
TEST(NixSystemInfoTest, QueriesTheLocalNix) {
  auto info = QueryNixSystemInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  ASSERT_FALSE(info->systems.empty());
  EXPECT_EQ(info->systems[0], "x86_64-linux");
}

}  // namespace
}  // namespace kiln
