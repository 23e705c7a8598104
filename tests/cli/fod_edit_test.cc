// kiln fod-hash --write: which edits are made, and which are left to a person.
#include "cli/fod_edit.h"

#include <gtest/gtest.h>

#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::ReadFileOrDie;
using testing::WriteFileOrDie;

constexpr char kFake[] = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
constexpr char kRight[] = "sha256-sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=";
constexpr char kOther[] = "sha256-fsQI/kYc4PAHcHb/J3W57z40jHx+sLiegND3o08DcGg=";

TEST(FodEditTest, ALoneFakeHashIsReplacedWhateverItsSpelling) {
  for (const std::string fake : {"lib.fakeHash", "pkgs.lib.fakeSha256", "fakeHash", "\"\""}) {
    testing::TempDir dir;
    WriteFileOrDie(dir.Sub("flake.nix"), "{\n  deps = mkDeps {\n    outputHash = " + fake + ";\n  };\n}\n");
    auto plan = PlanHashEdits(dir.path(), {{"deps", kFake, kRight}}, {});
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ(plan->edits.size(), 1u) << fake;
    EXPECT_EQ(plan->edits[0].file, "flake.nix");
    EXPECT_EQ(plan->edits[0].line, 3);
    EXPECT_EQ(plan->edits[0].after, std::string("    outputHash = \"") + kRight + "\";");
    ASSERT_TRUE(ApplyHashEdits(dir.path(), *plan).ok());
    EXPECT_EQ(ReadFileOrDie(dir.Sub("flake.nix")),
              std::string("{\n  deps = mkDeps {\n    outputHash = \"") + kRight + "\";\n  };\n}\n");
  }
}

TEST(FodEditTest, SeveralFakesAreMatchedByTheirNamesOrLeftToAPerson) {
  testing::TempDir dir;
  WriteFileOrDie(dir.Sub("flake.nix"),
                 "{\n"
                 "  a = fetch { name = \"node-modules\"; outputHash = lib.fakeHash; };\n"
                 "  b = fetch {\n"
                 "    pname = \"go-modules\";\n"
                 "    vendorHash = \"\";\n"
                 "  };\n"
                 "  c = fetch { name = \"mystery\"; hash = lib.fakeHash; };\n"
                 "}\n");
  auto plan = PlanHashEdits(
      dir.path(), {{"node-modules", kFake, kRight}, {"go-modules-1.2", kFake, kOther}, {"other", kFake, kRight}}, {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->edits.size(), 2u);
  EXPECT_EQ(plan->edits[0].line, 2);
  EXPECT_NE(plan->edits[0].after.find(kRight), std::string::npos);
  EXPECT_EQ(plan->edits[1].line, 5);
  EXPECT_EQ(plan->edits[1].after, std::string("    vendorHash = \"") + kOther + "\";");
  ASSERT_EQ(plan->left_to_do.size(), 1u);
  EXPECT_NE(plan->left_to_do[0].find("'other'"), std::string::npos) << plan->left_to_do[0];
}

TEST(FodEditTest, AStaleLiteralIsReplacedInAnySpellingUnlessAnotherFodSharesIt) {
  testing::TempDir dir;
  // The stale hash written in Nix's base32 with its algorithm.
  WriteFileOrDie(
      dir.Sub("nix/deps.nix"),
      "{ outputHashAlgo = \"sha256\"; outputHash = \"1krzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxi\"; }\n");
  WriteFileOrDie(dir.Sub("flake.nix"), "{ }\n");
  auto plan = PlanHashEdits(dir.path(), {{"deps", kRight, kOther}}, {});
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->edits.size(), 1u);
  EXPECT_EQ(plan->edits[0].file, "nix/deps.nix");
  EXPECT_EQ(plan->edits[0].after, std::string("{ outputHashAlgo = \"sha256\"; outputHash = \"") + kOther + "\"; }");

  auto shared = PlanHashEdits(dir.path(), {{"deps", kRight, kOther}}, {{"twin", kRight, kRight}});
  ASSERT_TRUE(shared.ok());
  EXPECT_TRUE(shared->edits.empty());
  ASSERT_EQ(shared->left_to_do.size(), 1u);
  EXPECT_NE(shared->left_to_do[0].find(kOther), std::string::npos);
}

TEST(FodEditTest, AFileChangedInBetweenIsNotOverwritten) {
  testing::TempDir dir;
  WriteFileOrDie(dir.Sub("flake.nix"), "{ outputHash = lib.fakeHash; }\n");
  auto plan = PlanHashEdits(dir.path(), {{"deps", kFake, kRight}}, {});
  ASSERT_TRUE(plan.ok());
  WriteFileOrDie(dir.Sub("flake.nix"), "{ outputHash = lib.fakeHash; # edited\n}\n");
  EXPECT_FALSE(ApplyHashEdits(dir.path(), *plan).ok());
  EXPECT_EQ(ReadFileOrDie(dir.Sub("flake.nix")), "{ outputHash = lib.fakeHash; # edited\n}\n");
}

}  // namespace
}  // namespace kiln
