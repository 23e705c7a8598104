// Image references by the OCI distribution grammar, and push patterns
// matched on their parsed parts.
#include "common/image_ref.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"

namespace kiln {
namespace {

TEST(ImageRefTest, ParsesWhatRegistriesAccept) {
  auto ref = ParseImageRef("rg.fr-par.scw.cloud/sanmarcsoft/web-api:testing");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(ref->registry, "rg.fr-par.scw.cloud");
  EXPECT_EQ(ref->repository, "sanmarcsoft/web-api");
  EXPECT_EQ(ref->tag, "testing");
  EXPECT_EQ(ref->Components(), (std::vector<std::string>{"sanmarcsoft", "web-api"}));
  for (const char* ok : {"127.0.0.1:5000/kiln/a", "localhost:5000/a.b/c__d/e---f:v1.2_x", "[::1]:5000/app:_tag",
                         "rg.example.eu/a@sha256:"
                         "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                         "Registry.Example/a:T"}) {
    auto parsed = ParseImageRef(ok);
    ASSERT_TRUE(parsed.ok()) << ok << ": " << parsed.status();
    EXPECT_EQ(parsed->ToString(), ok);  // One spelling.
  }
}

// Each refusal names the rule it breaks.
TEST(ImageRefTest, RefusesWhatARegistryWouldNormaliseOrRefuse) {
  const struct {
    const char* text;
    const char* says;
  } cases[] = {
      {"127.0.0.1:5998/team/../other/app:escaped", "path component '..' is not allowed"},
      {"127.0.0.1:5998/team/./app:t", "path component '.' is not allowed"},
      {"127.0.0.1:5998/x//y:t", "empty path component"},
      {"127.0.0.1:5998/x/y/:t", "empty path component"},
      {"127.0.0.1:5998/app:-x", "tag starts with a letter, digit or '_'"},
      {"127.0.0.1:5998/app:.x", "tag starts with a letter, digit or '_'"},
      {"127.0.0.1:5998/App:t", "path component 'App' is not allowed"},
      {"127.0.0.1:5998/a..b:t", "path component 'a..b'"},
      {"127.0.0.1:5998/a_-b:t", "path component 'a_-b'"},
      {"127.0.0.1:5998/a___b:t", "path component 'a___b'"},
      {"127.0.0.1:5998/-a:t", "path component '-a'"},
      {"app:t", "does not name a registry"},
      {"/app:t", "does not name a registry"},
      {"bad_host/app:t", "not a registry host"},
      {"host:99999999/app:t", "not a registry host"},
      {"host/app@sha256:abc", "not a digest"},
      {"host/app:t\x1b[31m", "tag starts"},
  };
  for (const auto& c : cases) {
    auto ref = ParseImageRef(c.text);
    ASSERT_FALSE(ref.ok()) << c.text;
    EXPECT_TRUE(absl::StrContains(ref.status().message(), c.says)) << c.text << ": " << ref.status();
  }
  EXPECT_FALSE(ParseImageRef("h/" + std::string(300, 'a')).ok());
  EXPECT_FALSE(ValidateImageTag(std::string(129, 'a')).ok());
  EXPECT_TRUE(ValidateImageTag(std::string(128, 'a')).ok());
  // Control characters are quoted, not echoed.
  auto escaped = ParseImageRef("host/app:t\x1b[31m");
  EXPECT_FALSE(absl::StrContains(escaped.status().message(), "\x1b")) << escaped.status();
}

TEST(ImageRefTest, PushTargetsNameTagsNeverADigest) {
  std::vector<std::string> tags;
  auto ref = ParsePushReference("rg.example.eu/team/app:testing", {"v1.2"}, &tags);
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(tags, (std::vector<std::string>{"testing", "v1.2"}));
  EXPECT_FALSE(ParsePushReference("rg.example.eu/team/app:testing", {"-x"}, &tags).ok());
  auto digest = ParsePushReference(
      "rg.example.eu/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", {}, &tags);
  ASSERT_FALSE(digest.ok());
  EXPECT_TRUE(absl::StrContains(digest.status().message(), "push to a tag, not a digest")) << digest.status();
  // As jobs carry it: the repository alone.
  EXPECT_TRUE(ParsePushRepository("rg.example.eu/team/app").ok());
  auto tagged = ParsePushRepository("rg.example.eu/team/app:t");
  ASSERT_FALSE(tagged.ok());
  EXPECT_TRUE(absl::StrContains(tagged.status().message(), "give tags separately")) << tagged.status();
  EXPECT_FALSE(ParsePushRepository("rg.example.eu/team/../app").ok());
}

bool Matches(const std::string& pattern, const std::string& ref) {
  auto p = ParseImagePattern(pattern);
  auto r = ParseImageRef(ref);
  EXPECT_TRUE(p.ok()) << pattern << ": " << p.status();
  return p.ok() && r.ok() && p->Matches(*r);
}

TEST(ImagePatternTest, MatchesOnTheParsedParts) {
  EXPECT_TRUE(Matches("rg.example.eu/team/*:testing", "rg.example.eu/team/api:testing"));
  EXPECT_TRUE(Matches("rg.example.eu/team/*:testing", "rg.example.eu/team/a/b:testing"));  // The subtree.
  EXPECT_FALSE(Matches("rg.example.eu/team/*:testing", "rg.example.eu/team:testing"));
  EXPECT_FALSE(Matches("rg.example.eu/team/*:testing", "rg.example.eu/team/api:production"));
  EXPECT_FALSE(Matches("rg.example.eu/team/*:testing", "rg.example.eu/other/api:testing"));
  EXPECT_FALSE(Matches("rg.example.eu/team/*:testing", "evil.example/team/api:testing"));
  EXPECT_FALSE(Matches("rg.example.eu/team/*", "rg.example.eu/team/../other/app:t"));  // Does not parse.
  // A glob inside a component stays inside it.
  EXPECT_TRUE(Matches("rg.example.eu/team/app-*", "rg.example.eu/team/app-web:t"));
  EXPECT_FALSE(Matches("rg.example.eu/team/app-*", "rg.example.eu/team/app-web/x:t"));
  EXPECT_FALSE(Matches("rg.example.eu/te*", "rg.example.eu/team/app:t"));
  EXPECT_TRUE(Matches("rg.example.eu/*/app:v*", "rg.example.eu/team/app:v2"));
  EXPECT_FALSE(Matches("rg.example.eu/*/app:v*", "rg.example.eu/team/x/app:v2"));
  EXPECT_TRUE(Matches("127.0.0.1:*/kiln/*", "127.0.0.1:5000/kiln/x:t"));
}

TEST(ImagePatternTest, RefusesPatternsThatCanMatchNothingSensible) {
  for (const char* bad :
       {"/team/*", "rg.example.eu//x", "rg.example.eu/x:", "rg.example.eu/X/y", "rg.example.eu/x y", "rg_x/y"}) {
    auto p = ParseImagePattern(bad);
    EXPECT_FALSE(p.ok()) << bad;
    if (!p.ok()) {
      EXPECT_TRUE(absl::StrContains(p.status().message(), "REGISTRY/REPOSITORY")) << p.status();
    }
  }
}

}  // namespace
}  // namespace kiln
