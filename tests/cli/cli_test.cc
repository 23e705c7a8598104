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

TEST(TargetsFromFileTest, ListsFlakesRelativeToTheFileAndRefusesWhatItCannotRead) {
  testing::TempDir repo;
  testing::WriteFileOrDie(repo.Sub("ci/kiln.json"),
                          R"({"targets": [{"flake": "../services/a", "attr": "oci-image"}, {"flake": "../b"}]})");
  auto targets = TargetsFromFile(repo.Sub("ci/kiln.json"));
  ASSERT_TRUE(targets.ok()) << targets.status();
  EXPECT_EQ(*targets, (std::vector<std::string>{repo.Sub("services/a") + "#oci-image", repo.Sub("b") + "#default"}));
  testing::WriteFileOrDie(repo.Sub("list.json"), R"([{"flake": "x", "attr": "y"}])");
  EXPECT_EQ(*TargetsFromFile(repo.Sub("list.json")), std::vector<std::string>{repo.Sub("x") + "#y"});

  testing::WriteFileOrDie(repo.Sub("bad.json"), "{ not json");
  EXPECT_EQ(TargetsFromFile(repo.Sub("bad.json")).status().code(), absl::StatusCode::kInvalidArgument);
  testing::WriteFileOrDie(repo.Sub("empty.json"), R"({"targets": []})");
  EXPECT_EQ(TargetsFromFile(repo.Sub("empty.json")).status().code(), absl::StatusCode::kInvalidArgument);
  testing::WriteFileOrDie(repo.Sub("noflake.json"), R"({"targets": [{"attr": "x"}]})");
  EXPECT_EQ(TargetsFromFile(repo.Sub("noflake.json")).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TargetsFromFile(repo.Sub("missing.json")).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kiln
