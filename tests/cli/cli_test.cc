#include "cli/cli.h"

#include <filesystem>

#include <gtest/gtest.h>

#include "tests/support/test_util.h"

namespace kiln {
namespace {
namespace fs = std::filesystem;

TEST(LocalityKeyTest, NamesTheFlakeByItsPathInTheRepository) {
  testing::TempDir repo;
  fs::create_directories(repo.Sub(".git"));
  fs::create_directories(repo.Sub("services/api"));
  EXPECT_EQ(LocalityKey(repo.Sub("services/api"), "oci-image"), "services/api#oci-image");
  EXPECT_EQ(LocalityKey(repo.path(), "default"), "#default");
  // A git worktree or submodule has a .git file rather than a directory.
  testing::TempDir worktree;
  testing::WriteFileOrDie(worktree.Sub(".git"), "gitdir: elsewhere\n");
  fs::create_directories(worktree.Sub("svc"));
  EXPECT_EQ(LocalityKey(worktree.Sub("svc"), "x"), "svc#x");
  // Outside a repository: the absolute path.
  testing::TempDir loose;
  EXPECT_EQ(LocalityKey(loose.path(), "x"), loose.path() + "#x");
}

}  // namespace
}  // namespace kiln
