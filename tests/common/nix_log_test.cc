#include "common/nix_log.h"

#include <gtest/gtest.h>

#include "absl/strings/str_split.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

std::string Render(const NixLogEvent& e) {
  const char* kind = e.kind == NixLogEvent::Kind::kBuildOutput ? "output"
                     : e.kind == NixLogEvent::Kind::kActivity  ? "activity"
                                                               : "message";
  return std::string(kind) + " level=" + std::to_string(e.level) + " drv=" + e.derivation + " | " + e.text + "\n";
}

// Real stderr of Nix 2.8 for a failing build, parsed; the rendering is a
// golden file so any change in what users see is reviewed.
TEST(NixLogParserTest, FailingBuildMatchesGolden) {
  const std::string input =
      testing::ReadFileOrDie(testing::SourcePath("tests/common/testdata/nix_build_failure.internal-json"));
  NixLogParser parser;
  std::string rendered;
  for (absl::string_view line : absl::StrSplit(input, '\n', absl::SkipEmpty())) {
    if (auto event = parser.ParseLine(line)) rendered += Render(*event);
  }
  testing::ExpectMatchesGolden(rendered, "tests/common/testdata/nix_build_failure.golden");
  ASSERT_EQ(parser.errors().size(), 1u);
  EXPECT_EQ(
      parser.errors()[0],
      "error: builder for '/nix/store/ljbcr4lpqks7ywlghvicricx88pfnkby-golden-sample.drv' failed with exit code 3");
}

TEST(NixLogParserTest, BuildOutputIsTaggedWithDerivationAndUncoloured) {
  NixLogParser parser;
  ASSERT_TRUE(parser.ParseLine(
      R"(@nix {"action":"start","fields":["/nix/store/abc-hello-1.0.drv","",1,1],"id":7,"level":3,"text":"building","type":105})"));
  auto line = parser.ParseLine(R"(@nix {"action":"result","fields":["\u001b[1mbold\u001b[0m"],"id":7,"type":101})");
  ASSERT_TRUE(line);
  EXPECT_EQ(line->kind, NixLogEvent::Kind::kBuildOutput);
  EXPECT_EQ(line->derivation, "hello-1.0");
  EXPECT_EQ(line->text, "bold");
}

TEST(NixLogParserTest, ChattyMessagesAreDropped) {
  NixLogParser parser;
  EXPECT_FALSE(parser.ParseLine(R"(@nix {"action":"msg","level":5,"msg":"chatty"})"));
  EXPECT_FALSE(parser.ParseLine(R"(@nix {"action":"start","id":1,"level":4,"text":"copying","type":0})"));
  auto warn = parser.ParseLine(R"(@nix {"action":"msg","level":1,"msg":"warning: dirty"})");
  ASSERT_TRUE(warn);
  EXPECT_EQ(warn->level, 1);
  EXPECT_TRUE(parser.errors().empty());
}

TEST(NixLogParserTest, PlainLinesPassThroughAndErrorsAreCollected) {
  NixLogParser parser;
  auto plain = parser.ParseLine("some plain text");
  ASSERT_TRUE(plain);
  EXPECT_EQ(plain->text, "some plain text");
  auto err = parser.ParseLine("\x1b[31;1merror:\x1b[0m flake has no attribute");
  ASSERT_TRUE(err);
  EXPECT_EQ(err->level, 0);
  ASSERT_EQ(parser.errors().size(), 1u);
  EXPECT_EQ(parser.errors()[0], "error: flake has no attribute");
  // Broken JSON is shown as it is rather than lost.
  auto broken = parser.ParseLine("@nix {not json");
  ASSERT_TRUE(broken);
  EXPECT_EQ(broken->text, "@nix {not json");
}

TEST(NixLogParserTest, FieldsOfTheWrongTypeAreIgnoredNotThrown) {
  // Found by tests/fuzz/nix_log_fuzz: nlohmann's value() throws on a field
  // of another type, which would have ended the worker's build thread.
  NixLogParser parser;
  auto msg = parser.ParseLine(R"(@nix {"action":"msg","level":"zero","msg":7})");
  ASSERT_TRUE(msg.has_value());
  EXPECT_EQ(msg->level, 3);
  EXPECT_EQ(msg->text, "");
  EXPECT_FALSE(parser.ParseLine(R"(@nix {"action":"start","id":-1,"type":"105","fields":{"a":1},"text":[1]})"));
  EXPECT_FALSE(parser.ParseLine(R"(@nix {"action":"result","type":101,"id":1e99,"fields":[2]})"));
  EXPECT_FALSE(parser.ParseLine(R"(@nix {"action":["stop"],"id":"1"})"));
  EXPECT_FALSE(parser.ParseLine(R"(@nix {"action":"stop","id":18446744073709551615})"));
}

TEST(NixBuildJsonTest, ParsesOutputs) {
  auto built = ParseNixBuildJson(
      R"([{"drvPath":"/nix/store/x-a.drv","outputs":{"out":"/nix/store/y-a","dev":"/nix/store/z-a-dev"}}])");
  ASSERT_TRUE(built.ok());
  ASSERT_EQ(built->size(), 1u);
  EXPECT_EQ((*built)[0].drv_path, "/nix/store/x-a.drv");
  EXPECT_EQ((*built)[0].outputs.at("out"), "/nix/store/y-a");
  EXPECT_EQ((*built)[0].outputs.at("dev"), "/nix/store/z-a-dev");
  EXPECT_FALSE(ParseNixBuildJson("").ok());
  EXPECT_FALSE(ParseNixBuildJson(R"({"not":"an array"})").ok());
}

TEST(OneLineNixErrorTest, KeepsTheFirstErrorAndCountsTheRest) {
  EXPECT_EQ(OneLineNixError("error: error: some outputs of '/nix/store/x-a.drv' are not valid, so checking is "
                            "not possible"),
            "some outputs of '/nix/store/x-a.drv' are not valid, so checking is not possible");
  EXPECT_EQ(OneLineNixError("error: builder for '/nix/store/x-a.drv' failed with exit code 1;\n"
                            "       last 2 log lines:\n       > fetching\n       > curl: (6) no host\n"
                            "       For full logs, run 'nix log /nix/store/x-a.drv'.\n"
                            "error: 1 dependencies of derivation '/nix/store/y-b.drv' failed to build"),
            "builder for '/nix/store/x-a.drv' failed with exit code 1 (and 1 more error)");
  EXPECT_EQ(OneLineNixError("\x1b[31;1merror:\x1b[0m cannot build\nerror: two\nerror: three"),
            "cannot build (and 2 more errors)");
  EXPECT_EQ(OneLineNixError("\n  \n"), "no error message");
  const std::string long_line(1000, 'x');
  EXPECT_EQ(OneLineNixError(long_line, 20), "xxxxxxxxxxxxxxxxx...");
}

TEST(DerivationShortNameTest, StripsStoreHashAndSuffix) {
  EXPECT_EQ(DerivationShortName("/nix/store/ljbcr4lpqks7ywlghvicricx88pfnkby-golden-sample.drv"), "golden-sample");
  EXPECT_EQ(DerivationShortName("not-a-store-path"), "not-a-store-path");
}

}  // namespace
}  // namespace kiln
