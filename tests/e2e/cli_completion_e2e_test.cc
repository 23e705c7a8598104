// `kiln completion`: the scripts complete what the command line accepts.
// bash is run for real on the generated script; zsh (through bashcompinit)
// and fish are checked for what they declare.
#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

std::string KilnBin() { return testing::BinPath("kiln"); }

// The words bash offers after `line` (the last word being completed).
std::string BashComplete(const std::string& words, int cword) {
  const std::string script = absl::StrCat("source <('", KilnBin(), "' completion bash); COMP_WORDS=(", words,
                                          "); COMP_CWORD=", cword, "; _kiln; echo \"${COMPREPLY[*]}\"");
  auto r = RunCommand({.argv = {"bash", "-c", script}, .extra_env = {}, .cwd = ""});
  EXPECT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
  return r.ok() ? std::string(absl::StripTrailingAsciiWhitespace(r->stdout_data)) : "";
}

TEST(CliCompletionE2eTest, BashCompletesCommandsAndEachCommandsOwnOptions) {
  EXPECT_EQ(BashComplete("kiln st", 1), "status");
  EXPECT_EQ(BashComplete("kiln build --det", 2), "--detach");
  EXPECT_EQ(BashComplete("kiln log --fol", 2), "--follow");
  EXPECT_EQ(BashComplete("kiln status --wr", 2), "") << "--write belongs to fod-hash";
  EXPECT_EQ(BashComplete("kiln status --coord", 2), "--coordinator") << "the coordinator's options go anywhere";
}

TEST(CliCompletionE2eTest, ZshAndFishScriptsDeclareTheCommandsAndTheirOptions) {
  auto zsh = RunCommand({.argv = {KilnBin(), "completion", "zsh"}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(zsh.ok() && zsh->exit.Success());
  EXPECT_TRUE(absl::StrContains(zsh->stdout_data, "bashcompinit")) << zsh->stdout_data;
  EXPECT_TRUE(absl::StrContains(zsh->stdout_data, "complete -F _kiln kiln"));
  auto fish = RunCommand({.argv = {KilnBin(), "completion", "fish"}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(fish.ok() && fish->exit.Success());
  EXPECT_TRUE(absl::StrContains(fish->stdout_data, "-n __fish_use_subcommand -a build")) << fish->stdout_data;
  EXPECT_TRUE(absl::StrContains(fish->stdout_data, "-n '__fish_seen_subcommand_from build' -l detach"));
  auto other = RunCommand({.argv = {KilnBin(), "completion", "tcsh"}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(other->exit.exit_code, 2) << "an unknown shell is bad usage";
}

}  // namespace
}  // namespace kiln
