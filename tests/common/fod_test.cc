// Hash spellings, .drv parsing, the FOD key and Nix's hash-mismatch errors.
// The .drv files under testdata/drv were written by Nix 2.8 from one flake
// (a FOD `dep-a` declared with a fake, an empty, the right and a stale hash,
// and variations of its inputs); the mismatch texts are one per known form.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/derivation.h"
#include "common/hash_mismatch.h"
#include "common/nix_hash.h"
#include "common/nix_log.h"
#include "common/subprocess.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

constexpr absl::string_view kRight = "sha256-sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=";
constexpr absl::string_view kFake = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

FixedOutput Fod(absl::string_view file) {
  const std::string text =
      testing::ReadFileOrDie(testing::SourcePath(absl::StrCat("tests/common/testdata/drv/", file)));
  absl::StatusOr<Derivation> drv = ParseDerivation(text);
  EXPECT_TRUE(drv.ok()) << file << ": " << drv.status();
  std::optional<FixedOutput> fod = drv.ok() ? GetFixedOutput(*drv) : std::nullopt;
  EXPECT_TRUE(fod.has_value()) << file;
  return fod.value_or(FixedOutput{});
}

TEST(NixHashTest, EverySpellingGivesTheSameSri) {
  // The same digest as Nix 2.8 prints it (`nix hash to-base32/to-base16`).
  for (absl::string_view spelled :
       {kRight, absl::string_view("sha256:1krzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxi"),
        absl::string_view("sha256:b1778eaf3a61a27b5b55af3c9cf89db6e78785c0cf195cf53c9671d8a8913fcf"),
        absl::string_view("sha256:sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=")}) {
    absl::StatusOr<NixHash> h = ParseNixHash(spelled);
    ASSERT_TRUE(h.ok()) << spelled << ": " << h.status();
    EXPECT_EQ(h->Sri(), kRight) << spelled;
    EXPECT_EQ(h->Base32(), "1krzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxi");
    EXPECT_EQ(h->Base16(), "b1778eaf3a61a27b5b55af3c9cf89db6e78785c0cf195cf53c9671d8a8913fcf");
    EXPECT_FALSE(h->IsFake());
  }
  absl::StatusOr<NixHash> bare =
      ParseNixHash("1krzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxi", HashAlgo::kSha256);
  ASSERT_TRUE(bare.ok());
  EXPECT_EQ(bare->Sri(), kRight);
  EXPECT_TRUE(ParseNixHash(kFake)->IsFake());
}

TEST(NixHashTest, BadSpellingsAreRefusedWithAReason) {
  EXPECT_FALSE(ParseNixHash("1krzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxi").ok());         // No algorithm.
  EXPECT_FALSE(ParseNixHash("sha256:1krzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxe").ok());  // 'e'
  EXPECT_FALSE(ParseNixHash("sha256-abc=").ok());
  EXPECT_FALSE(ParseNixHash("blake3-sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=").ok());
  EXPECT_FALSE(ParseNixHash(kRight, HashAlgo::kSha512).ok());
  // The top digit of a 32-byte hash carries only one bit.
  EXPECT_FALSE(ParseNixHash("sha256:zkrzj6ldhwcn7ksmq6fgq22qgrxnkpw9qg5gamdpp8k17apqwxxi").ok());
  absl::StatusOr<NixHash> sha1 = ParseNixHash("sha1:0000000000000000000000000000000000000000");
  ASSERT_TRUE(sha1.ok());
  EXPECT_EQ(sha1->Sri(), "sha1-AAAAAAAAAAAAAAAAAAAAAAAAAAA=");
}

TEST(DerivationTest, ParsesEscapesInputsAndEnv) {
  const std::string text = testing::ReadFileOrDie(testing::SourcePath("tests/common/testdata/drv/tricky.drv"));
  absl::StatusOr<Derivation> drv = ParseDerivation(text);
  ASSERT_TRUE(drv.ok()) << drv.status();
  EXPECT_EQ(drv->system, "x86_64-linux");
  EXPECT_EQ(drv->builder, "/bin/sh");
  ASSERT_EQ(drv->args.size(), 2u);
  EXPECT_EQ(drv->args[1].substr(0, 35), "printf '%s\\n' \"quote\\\"d\" 'tab\there'");
  ASSERT_EQ(drv->input_drvs.size(), 1u);
  EXPECT_EQ(drv->input_drvs.begin()->first, "/nix/store/3dq0nzldrhz9nwrg4d735crryxlprp5p-dep-a.drv");
  EXPECT_EQ(drv->input_drvs.begin()->second, std::vector<std::string>{"out"});
  EXPECT_EQ(drv->env.at("name"), "tricky");
  EXPECT_FALSE(GetFixedOutput(*drv).has_value());  // Input-addressed.
}

TEST(DerivationTest, RefusesWhatIsNotATermDerivation) {
  EXPECT_FALSE(ParseDerivation("").ok());
  EXPECT_FALSE(ParseDerivation("{\"outputs\":{}}").ok());
  EXPECT_FALSE(ParseDerivation("Derive([(\"out\",\"/nix/store/x\",\"\",\"\")],[],[],\"s\",\"b\",[],[]").ok());
  EXPECT_FALSE(ParseDerivation("Derive([],[],[],\"s\",\"b\",[],[]) trailing").ok());
  absl::StatusOr<Derivation> unterminated = ParseDerivation("Derive([(\"out");
  ASSERT_FALSE(unterminated.ok());
  EXPECT_TRUE(absl::StrContains(unterminated.status().message(), "offset")) << unterminated.status();
}

TEST(FodKeyTest, FakeEmptyRightAndStaleHashesOfTheSameInputsShareTheKey) {
  const FixedOutput fake = Fod("fake.drv");
  const FixedOutput empty = Fod("empty.drv");
  const FixedOutput right = Fod("right.drv");
  const FixedOutput base32 = Fod("right-base32.drv");
  EXPECT_EQ(fake.name, "dep-a");
  EXPECT_EQ(fake.mode, "flat");
  EXPECT_TRUE(fake.declared.IsFake());
  EXPECT_TRUE(empty.declared.IsFake());
  EXPECT_EQ(right.declared.Sri(), kRight);
  EXPECT_EQ(base32.declared.Sri(), kRight);
  EXPECT_NE(fake.output_path, right.output_path);
  EXPECT_EQ(fake.key.size(), 64u);
  EXPECT_EQ(fake.key, empty.key);
  EXPECT_EQ(fake.key, right.key);
  EXPECT_EQ(fake.key, base32.key);
}

TEST(FodKeyTest, AnyInputChangeGivesANewKey) {
  const std::string base = Fod("right.drv").key;
  const FixedOutput lock = Fod("stale-lock.drv");  // The builder's script changed, the hash did not.
  const FixedOutput env = Fod("stale-env.drv");    // An env var was added, the hash did not change.
  const FixedOutput recursive = Fod("recursive.drv");
  EXPECT_EQ(lock.declared.Sri(), kRight);
  EXPECT_EQ(lock.output_path, Fod("right.drv").output_path);  // Why a stale hash is silent.
  EXPECT_NE(lock.key, base);
  EXPECT_NE(env.key, base);
  EXPECT_NE(recursive.key, base);
  EXPECT_EQ(recursive.mode, "recursive");

  // Field by field on a parsed copy: each input moves the key, the declared
  // hash and output path do not.
  const std::string text = testing::ReadFileOrDie(testing::SourcePath("tests/common/testdata/drv/right.drv"));
  absl::StatusOr<Derivation> parsed = ParseDerivation(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const Derivation original = *parsed;
  const auto key_of = [](const Derivation& d) { return GetFixedOutput(d)->key; };
  Derivation d = original;
  d.system = "aarch64-linux";
  EXPECT_NE(key_of(d), base);
  d = original;
  d.builder = "/bin/bash";
  EXPECT_NE(key_of(d), base);
  d = original;
  d.input_srcs.push_back("/nix/store/00000000000000000000000000000000-bun.lock");
  EXPECT_NE(key_of(d), base);
  d = original;
  d.input_drvs["/nix/store/00000000000000000000000000000000-bun.drv"] = {"out"};
  EXPECT_EQ(key_of(d), "") << "an input derivation is not a path yet: no key before it is resolved";
  const OutputPaths bun = {{"/nix/store/00000000000000000000000000000000-bun.drv",
                            {{"out", "/nix/store/22222222222222222222222222222222-bun"}}}};
  absl::StatusOr<Derivation> resolved = ResolveInputs(d, bun);
  ASSERT_TRUE(resolved.ok()) << resolved.status();
  EXPECT_TRUE(resolved->input_drvs.empty());
  EXPECT_NE(key_of(*resolved), base);
  // The same derivation as a remote builder receives it: the output among
  // the sources. One key for both, so the gateway and `kiln build` share it.
  Derivation basic = original;
  basic.input_srcs.push_back("/nix/store/22222222222222222222222222222222-bun");
  EXPECT_EQ(key_of(basic), key_of(*resolved));
  Derivation other = d;
  other.input_drvs.begin()->second = {"dev"};
  EXPECT_TRUE(absl::IsNotFound(ResolveInputs(other, bun).status())) << "an output the input does not have";
  EXPECT_TRUE(absl::IsNotFound(ResolveInputs(d, {}).status()));
  d = original;
  d.outputs["out"].hash_algo = "sha512";
  d.outputs["out"].hash = std::string(128, '0');
  EXPECT_NE(key_of(d), base);
  d = original;
  d.outputs["out"].hash = std::string(64, '0');
  d.outputs["out"].path = "/nix/store/11111111111111111111111111111111-dep-a";
  d.env["out"] = d.outputs["out"].path;
  d.env["outputHash"] = "";
  EXPECT_EQ(key_of(d), base);
}

// A derivation in ATerm form, for a closure written by hand.
std::string Aterm(const std::string& out, const std::vector<std::string>& input_drvs,
                  const std::vector<std::pair<std::string, std::string>>& env, const std::string& hash = "") {
  std::string drvs;
  for (const std::string& d : input_drvs) absl::StrAppend(&drvs, drvs.empty() ? "" : ",", "(\"", d, "\",[\"out\"])");
  std::string e;
  for (const auto& [k, v] : env) absl::StrAppend(&e, e.empty() ? "" : ",", "(\"", k, "\",\"", v, "\")");
  return absl::StrCat("Derive([(\"out\",\"", out, "\",\"", hash.empty() ? "" : "sha256", "\",\"", hash, "\")],[", drvs,
                      "],[],\"x86_64-linux\",\"/bin/sh\",[],[", e, "])");
}

// The closure as scheduling needs it: every derivation once, inputs before
// what needs them, features and flags from the environment, FODs keyed.
TEST(DerivationClosureTest, EveryDerivationOnceInputsFirstWithItsFlags) {
  testing::TempDir dir;
  const auto drv = [&](const std::string& name) { return dir.Sub(name + ".drv"); };
  const auto out = [](const std::string& c) { return "/nix/store/" + std::string(32, c[0]) + "-" + c; };
  testing::WriteFileOrDie(drv("d"), Aterm(out("d"), {}, {{"name", "d"}}));
  testing::WriteFileOrDie(drv("b"),
                          Aterm(out("b"), {drv("d")}, {{"name", "b"}, {"requiredSystemFeatures", "kvm big-parallel"}}));
  testing::WriteFileOrDie(drv("c"), Aterm(out("c"), {drv("d")}, {{"name", "c"}, {"outputHash", ""}},
                                          std::string(64, '0')));  // A FOD (a fake hash) taking d.
  testing::WriteFileOrDie(drv("a"), Aterm(out("a"), {drv("b"), drv("c")},
                                          {{"name", "a"}, {"preferLocalBuild", "1"}, {"allowSubstitutes", ""}}));
  absl::StatusOr<DerivationClosure> closure = ReadDerivationClosure(drv("a"));
  ASSERT_TRUE(closure.ok()) << closure.status();
  ASSERT_EQ(closure->nodes.size(), 4u);
  std::map<std::string, size_t> at;
  for (size_t i = 0; i < closure->nodes.size(); ++i) at[closure->nodes[i].drv_path] = i;
  EXPECT_LT(at[drv("d")], at[drv("b")]);
  EXPECT_LT(at[drv("d")], at[drv("c")]);
  EXPECT_LT(at[drv("b")], at[drv("a")]);
  EXPECT_LT(at[drv("c")], at[drv("a")]);
  const ClosureNode& a = closure->nodes[at[drv("a")]];
  EXPECT_EQ(a.input_drvs, (std::vector<std::string>{drv("b"), drv("c")}));
  EXPECT_EQ(a.outputs.at("out"), out("a"));
  EXPECT_EQ(a.system, "x86_64-linux");
  EXPECT_TRUE(a.prefer_local_build);
  EXPECT_FALSE(a.allow_substitutes);
  const ClosureNode& b = closure->nodes[at[drv("b")]];
  EXPECT_EQ(b.required_features, (std::vector<std::string>{"kvm", "big-parallel"}));
  EXPECT_FALSE(b.prefer_local_build);
  EXPECT_TRUE(b.allow_substitutes);
  ASSERT_EQ(closure->fods.size(), 1u);
  EXPECT_EQ(closure->fods[0].drv_path, drv("c"));
  EXPECT_EQ(closure->fods[0].fod.key.size(), 64u) << "keyed over d's output path";
  // The same FODs as the FOD layer's own walk.
  absl::StatusOr<std::vector<ClosureFod>> fods = FixedOutputsOfClosure(drv("a"));
  ASSERT_TRUE(fods.ok());
  ASSERT_EQ(fods->size(), 1u);
  EXPECT_EQ((*fods)[0].fod.key, closure->fods[0].fod.key);
  EXPECT_TRUE(absl::IsResourceExhausted(ReadDerivationClosure(drv("a"), 3).status()));
}

// Against Nix 2.8: the closure of a graph it instantiated holds exactly the
// .drv files `nix-store --query --requisites` names.
TEST(DerivationClosureTest, MatchesWhatNixQueriesOfARealClosure) {
  testing::TempDir dir;
  testing::WriteFileOrDie(dir.Sub("graph.nix"), absl::StrCat(R"(let
  step = name: deps: derivation {
    inherit name deps; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo ${name} > $out" ]; nonce = ")",
                                                             dir.path(), R"(";
  };
  base = step "closure-base" [ ];
in step "closure-top" [ (step "closure-left" [ base ]) (step "closure-right" [ base ]) ])"));
  absl::StatusOr<CommandResult> drv =
      RunCommand({.argv = {"nix-instantiate", dir.Sub("graph.nix")}, .extra_env = testing::NixTestEnv(), .cwd = ""});
  ASSERT_TRUE(drv.ok() && drv->exit.Success()) << (drv.ok() ? drv->stderr_data : drv.status().ToString());
  const std::string top(absl::StripAsciiWhitespace(drv->stdout_data));
  absl::StatusOr<CommandResult> q = RunCommand(
      {.argv = {"nix-store", "--query", "--requisites", top}, .extra_env = testing::NixTestEnv(), .cwd = ""});
  ASSERT_TRUE(q.ok() && q->exit.Success());
  std::set<std::string> nix_drvs;
  for (absl::string_view line : absl::StrSplit(q->stdout_data, '\n', absl::SkipEmpty())) {
    if (absl::EndsWith(line, ".drv")) nix_drvs.insert(std::string(line));
  }
  absl::StatusOr<DerivationClosure> closure = ReadDerivationClosure(top);
  ASSERT_TRUE(closure.ok()) << closure.status();
  std::set<std::string> ours;
  for (const ClosureNode& n : closure->nodes) ours.insert(n.drv_path);
  EXPECT_EQ(ours, nix_drvs);
  EXPECT_EQ(closure->nodes.back().drv_path, top);
  EXPECT_EQ(closure->nodes.back().name, "closure-top");
  EXPECT_EQ(closure->nodes.front().name, "closure-base");
}

std::string Render(const std::vector<HashMismatch>& found) {
  std::string out;
  for (const HashMismatch& m : found) {
    absl::StrAppend(&out, m.path, m.path_is_drv ? " (drv)" : " (output)", "\n  specified ", m.specified,
                    "\n  got       ", m.got, m.url.empty() ? "" : "\n  url       ", m.url, "\n");
  }
  return out;
}

// Each known form of the error, parsed; the rendering is a golden file.
TEST(HashMismatchTest, KnownFormsMatchGolden) {
  for (absl::string_view name : {"nix-2.8.txt", "nix-2.3.txt", "lix.txt", "mixed-spellings.txt"}) {
    const std::string dir = "tests/common/testdata/hash_mismatch/";
    const std::string text = testing::ReadFileOrDie(testing::SourcePath(absl::StrCat(dir, name)));
    testing::ExpectMatchesGolden(Render(ParseHashMismatches(text)), absl::StrCat(dir, name, ".golden"));
  }
}

TEST(HashMismatchTest, KeepGoingReportsEveryMismatchThroughTheLogParser) {
  // What the worker does: internal-json through NixLogParser, then its errors.
  const std::string input = testing::ReadFileOrDie(
      testing::SourcePath("tests/common/testdata/hash_mismatch/nix-2.8-keep-going.internal-json"));
  NixLogParser parser;
  for (absl::string_view line : absl::StrSplit(input, '\n', absl::SkipEmpty())) parser.ParseLine(line);
  const std::vector<HashMismatch> found = ParseHashMismatches(absl::StrJoin(parser.errors(), "\n"));
  ASSERT_EQ(found.size(), 2u);
  EXPECT_EQ(found[0].path, "/nix/store/gx25w3mvqj8v3nm9i1gdfg15rrf3h1pq-dep-b.drv");
  EXPECT_EQ(found[1].path, "/nix/store/1v08qbkwxfajskrmk2k32749y68ha3n9-dep-c.drv");
  for (const HashMismatch& m : found) {
    EXPECT_EQ(m.specified, kFake);
    EXPECT_EQ(m.got, kRight);
  }
  EXPECT_TRUE(ParseHashMismatches("error: builder for '/nix/store/x.drv' failed with exit code 1").empty());
}

}  // namespace
}  // namespace kiln
