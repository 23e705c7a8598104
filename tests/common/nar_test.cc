// The NAR reader and narinfo signatures against real Nix: a store path Nix
// made is dumped by Nix and read here (the same hash and size Nix records),
// a key Nix generated signs here exactly as Nix signs, and malformed NARs
// built by hand are refused, each saying where and why.
#include "common/nar.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <cstring>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/digest.h"
#include "common/nar_dump.h"
#include "common/narinfo.h"
#include "common/nix_hash.h"
#include "common/subprocess.h"
#include "tests/support/nar_builder.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> NixEnv() { return {"NIX_CONFIG=substituters =\nexperimental-features = nix-command flakes"}; }

// Runs a Nix command; its stdout, trimmed.
std::string Nix(const std::vector<std::string>& argv) {
  absl::StatusOr<CommandResult> r = RunCommand({.argv = argv, .extra_env = NixEnv(), .cwd = ""});
  EXPECT_TRUE(r.ok() && r->exit.Success())
      << absl::StrJoin(argv, " ") << ": " << (r.ok() ? r->stderr_data : r.status().ToString());
  return r.ok() ? std::string(absl::StripAsciiWhitespace(r->stdout_data)) : "";
}

// A tree with every kind of entry, added to the store by Nix.
std::string AddTreeToStore(const testing::TempDir& dir) {
  const fs::path root = dir.Sub(absl::StrCat("tree-", absl::ToUnixNanos(absl::Now())));
  fs::create_directories(root / "sub" / "deeper");
  std::ofstream(root / "a.txt") << "hello\n";
  std::ofstream(root / "sub" / "seven") << "1234567";  // Needs padding.
  std::ofstream(root / "sub" / "deeper" / "empty");
  std::ofstream(root / "run.sh") << "#!/bin/sh\necho run\n";
  fs::permissions(root / "run.sh", fs::perms::owner_exec, fs::perm_options::add);
  fs::create_symlink("sub/seven", root / "link");
  return Nix({"nix-store", "--add", root.string()});
}

using testing::NarArchive;
using testing::NarDirectory;
using testing::NarFile;
using testing::NarString;

TEST(NarTest, ReadsWhatNixDumpsWithTheHashAndSizeNixRecords) {
  testing::TempDir dir;
  const std::string path = AddTreeToStore(dir);
  ASSERT_TRUE(absl::StartsWith(path, "/nix/store/")) << path;
  absl::StatusOr<CommandResult> dump =
      RunCommand({.argv = {"nix-store", "--dump", path}, .extra_env = NixEnv(), .cwd = ""});
  ASSERT_TRUE(dump.ok() && dump->exit.Success());

  absl::StatusOr<NarSummary> nar = ReadNar(dump->stdout_data);
  ASSERT_TRUE(nar.ok()) << nar.status();
  NixHash hash;
  hash.algo = HashAlgo::kSha256;
  hash.bytes = nar->sha256;
  EXPECT_EQ(absl::StrCat("sha256:", hash.Base32()), Nix({"nix-store", "--query", "--hash", path}));
  EXPECT_EQ(absl::StrCat(nar->nar_bytes), Nix({"nix-store", "--query", "--size", path}));
  EXPECT_EQ(nar->regular_files, 4u);
  EXPECT_EQ(nar->executables, 1u);
  EXPECT_EQ(nar->directories, 3u);
  EXPECT_EQ(nar->symlinks, 1u);
  EXPECT_EQ(nar->content_bytes, 6u + 7u + 0u + 19u);
}

// `nix-store --dump PATH`'s output.
std::string NixDump(const std::string& path) {
  absl::StatusOr<CommandResult> dump =
      RunCommand({.argv = {"nix-store", "--dump", path}, .extra_env = NixEnv(), .cwd = ""});
  EXPECT_TRUE(dump.ok() && dump->exit.Success()) << path;
  return dump.ok() ? dump->stdout_data : "";
}

// DumpPathAsNar's output, and how many pieces it came in.
std::string OurDump(const std::string& path, size_t* pieces = nullptr) {
  std::string out;
  absl::Status s = DumpPathAsNar(path, [&](absl::string_view bytes) {
    out.append(bytes.data(), bytes.size());
    if (pieces != nullptr) ++*pieces;
    return absl::OkStatus();
  });
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

TEST(NarDumpTest, DumpsAStorePathByteForByteAsNixDoes) {
  testing::TempDir dir;
  const std::string path = AddTreeToStore(dir);
  ASSERT_TRUE(absl::StartsWith(path, "/nix/store/")) << path;
  EXPECT_EQ(OurDump(path), NixDump(path));
  // A single file and a symlink at the root, too.
  for (const std::string sub : {"/a.txt", "/link"}) EXPECT_EQ(OurDump(path + sub), NixDump(path + sub)) << sub;
}

TEST(NarDumpTest, LargeFilesStreamInPiecesAndTheSinksErrorStopsTheDump) {
  testing::TempDir dir;
  const std::string big = dir.Sub("big");
  std::ofstream(big) << std::string(3 << 20, 'x');
  size_t pieces = 0;
  const std::string ours = OurDump(big, &pieces);
  absl::StatusOr<NarSummary> read = ReadNar(ours);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->content_bytes, 3u << 20);
  EXPECT_GT(pieces, 3u);
  int calls = 0;
  absl::Status stopped = DumpPathAsNar(
      big, [&](absl::string_view) { return ++calls == 2 ? absl::CancelledError("enough") : absl::OkStatus(); });
  EXPECT_TRUE(absl::IsCancelled(stopped)) << stopped;
  EXPECT_EQ(calls, 2);
  EXPECT_FALSE(DumpPathAsNar(dir.Sub("absent"), [](absl::string_view) { return absl::OkStatus(); }).ok());
}

TEST(NarTest, WellFormedByHandIsAccepted) {
  const std::string nar = NarArchive(NarDirectory({{"a", NarFile("x")}, {"b", NarFile("")}}));
  absl::StatusOr<NarSummary> read = ReadNar(nar);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->nar_bytes, nar.size());
}

TEST(NarTest, MalformedArchivesAreRefusedSayingWhereAndWhy) {
  const std::string good = NarArchive(NarDirectory({{"a", NarFile("x")}, {"b", NarDirectory({{"c", NarFile("y")}})}}));
  struct Case {
    std::string nar;
    std::string says;
  };
  std::string bad_padding = NarArchive(NarFile("x"));
  bad_padding[bad_padding.size() - 8 - 8 - 1] = '\1';  // In the padding after "x".
  const std::vector<Case> cases = {
      {"", "truncated"},
      {NarString("nix-archive-2") + NarFile("x"), "no nix-archive-1 header"},
      {good.substr(0, good.size() - 3), "truncated"},
      {good + NarString("more"), "bytes after the end"},
      {bad_padding, "non-zero padding"},
      {NarArchive(NarDirectory({{"..", NarFile("x")}})), "an entry named '..'"},
      {NarArchive(NarDirectory({{"a/b", NarFile("x")}})), "an entry named 'a/b'"},
      {NarArchive(NarDirectory({{"", NarFile("x")}})), "an entry named ''"},
      {NarArchive(NarDirectory({{"b", NarFile("x")}, {"a", NarFile("y")}})), "not in order"},
      {NarArchive(NarDirectory({{"a", NarFile("x")}, {"a", NarFile("y")}})), "not in order"},
      {NarArchive(NarString("(") + NarString("type") + NarString("fifo") + NarString(")")), "unknown type 'fifo'"},
      {NarArchive(
           NarDirectory({{"sub", NarDirectory({{"x", NarString("(") + NarString("type") + NarString("symlink") +
                                                         NarString("target") + NarString("") + NarString(")")}})}})),
       "at /sub/x"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<NarSummary> read = ReadNar(c.nar);
    ASSERT_FALSE(read.ok()) << "accepted; expected: " << c.says;
    EXPECT_TRUE(absl::StrContains(read.status().message(), c.says)) << read.status();
  }
}

// A NAR at the head of a stream (Nix's export format): read to its last
// byte and not one byte further, however the source hands bytes out.
TEST(NarTest, APrefixIsReadToItsEndAndNoFurther) {
  const std::string nar = NarArchive(NarDirectory({{"a", NarFile(std::string(100000, 'x'))}, {"b", NarFile("y")}}));
  const std::string stream = nar + "AFTER THE ARCHIVE";
  size_t at = 0;
  absl::StatusOr<NarSummary> read = ReadNarPrefix([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min(size, stream.size() - at);
    std::memcpy(buf, stream.data() + at, n);
    at += n;
    return n;
  });
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->nar_bytes, nar.size());
  EXPECT_EQ(at, nar.size()) << "read past the archive";
  EXPECT_EQ(read->sha256, absl::HexStringToBytes(Sha256Hex(nar)));
  at = 0;
  const std::string cut = nar.substr(0, nar.size() - 8);
  EXPECT_TRUE(absl::IsDataLoss(ReadNarPrefix([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
                                 const size_t n = std::min(size, cut.size() - at);
                                 std::memcpy(buf, cut.data() + at, n);
                                 at += n;
                                 return n;
                               }).status()));
}

TEST(NarTest, TheFileOfAOneFileNarIsItsContents) {
  absl::StatusOr<std::string> drv = RegularFileOfNar(NarArchive(NarFile("Derive([])")), 1024);
  ASSERT_TRUE(drv.ok()) << drv.status();
  EXPECT_EQ(*drv, "Derive([])");
  EXPECT_TRUE(absl::IsResourceExhausted(RegularFileOfNar(NarArchive(NarFile(std::string(2000, 'x'))), 1024).status()));
  EXPECT_TRUE(
      absl::IsInvalidArgument(RegularFileOfNar(NarArchive(NarDirectory({{"a", NarFile("x")}})), 1024).status()));
  EXPECT_FALSE(RegularFileOfNar(NarArchive(NarFile("x")) + "trailing", 1024).ok());
}

TEST(NarTest, LimitsBoundSizeEntriesAndDepth) {
  NarLimits small;
  small.max_nar_bytes = 200;
  EXPECT_TRUE(absl::IsResourceExhausted(ReadNar(NarArchive(NarFile(std::string(300, 'x'))), small).status()));
  NarLimits few;
  few.max_entries = 2;
  EXPECT_TRUE(absl::IsResourceExhausted(
      ReadNar(NarArchive(NarDirectory({{"a", NarFile("")}, {"b", NarFile("")}})), few).status()));
  NarLimits shallow;
  shallow.max_depth = 2;
  EXPECT_FALSE(
      ReadNar(NarArchive(NarDirectory({{"a", NarDirectory({{"b", NarDirectory({{"c", NarFile("")}})}})}})), shallow)
          .ok());
  // A string's claimed length is checked before it is read.
  std::string huge =
      NarString("nix-archive-1") + NarString("(") + NarString("type") + NarString("symlink") + NarString("target");
  huge += std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8);
  EXPECT_TRUE(absl::StrContains(ReadNar(huge).status().message(), "a symlink target of"));
}

TEST(NarInfoTest, SignsAsNixSignsWithAKeyNixMadeAndVerifiesNixsSignature) {
  testing::TempDir dir;
  const std::string path = AddTreeToStore(dir);
  Nix({"nix-store", "--generate-binary-cache-key", "test-farm-1", dir.Sub("sk"), dir.Sub("pk")});
  absl::StatusOr<SigningKey> key = SigningKey::Parse(testing::ReadFileOrDie(dir.Sub("sk")));
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(key->PublicKeyText(), absl::StripAsciiWhitespace(testing::ReadFileOrDie(dir.Sub("pk"))));

  // Nix signs the path in its store; Kiln signs its fingerprint.
  Nix({"nix", "store", "sign", "--key-file", dir.Sub("sk"), path});
  const std::string sigs = Nix({"nix", "path-info", "--sigs", path});
  NarInfo info;
  info.store_path = path;
  info.nar_hash = Nix({"nix-store", "--query", "--hash", path});
  info.nar_size = std::stoull(Nix({"nix-store", "--query", "--size", path}));
  absl::StatusOr<std::string> sig = key->Sign(info.Fingerprint());
  ASSERT_TRUE(sig.ok());
  EXPECT_TRUE(absl::StrContains(sigs, *sig)) << sigs << "\nvs " << *sig;  // Ed25519 is deterministic.

  const std::vector<std::string> trusted = {key->PublicKeyText()};
  EXPECT_TRUE(VerifySignature(info.Fingerprint(), *sig, trusted));
  NarInfo tampered = info;
  tampered.nar_size += 1;
  EXPECT_FALSE(VerifySignature(tampered.Fingerprint(), *sig, trusted));
  absl::StatusOr<SigningKey> other = SigningKey::Generate("test-farm-1");
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(VerifySignature(info.Fingerprint(), *sig, {other->PublicKeyText()}));
  EXPECT_FALSE(VerifySignature(info.Fingerprint(), "test-farm-1:bm90IGEgc2lnbmF0dXJl", trusted));
}

TEST(NarInfoTest, RendersAndParsesNixsLayout) {
  NarInfo info;
  info.store_path = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello";
  info.url = "nar/1111111111111111111111111111111111111111111111111111.nar.zst";
  info.compression = "zstd";
  info.file_hash = "sha256:1111111111111111111111111111111111111111111111111111";
  info.file_size = 12;
  info.nar_hash = "sha256:0000000000000000000000000000000000000000000000000000";
  info.nar_size = 120;
  info.references = {"0123456789abcdfghijklmnpqrsvwxyz-hello", "1123456789abcdfghijklmnpqrsvwxyz-glibc"};
  info.deriver = "2123456789abcdfghijklmnpqrsvwxyz-hello.drv";
  info.sigs = {"k:c2ln"};
  absl::StatusOr<NarInfo> parsed = ParseNarInfo(info.Render() + "Unknown: skipped\n");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->Render(), info.Render());
  EXPECT_EQ(
      info.Fingerprint(),
      "1;/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello;sha256:0000000000000000000000000000000000000000000000000000;"
      "120;/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello,/nix/store/1123456789abcdfghijklmnpqrsvwxyz-glibc");

  EXPECT_FALSE(ParseNarInfo("StorePath: /nix/store/x\n").ok());
  EXPECT_FALSE(ParseNarInfo("no colon here\n").ok());
  EXPECT_FALSE(ParseNarInfo(info.Render() + "References: ../../etc\n").ok());
  EXPECT_FALSE(ParseNarInfo(std::string(2 << 20, 'x')).ok());
}

TEST(NarInfoTest, ASecretKeyWhoseHalvesDoNotMatchIsRefusedWithoutQuotingIt) {
  absl::StatusOr<SigningKey> a = SigningKey::Generate("k"), b = SigningKey::Generate("k");
  ASSERT_TRUE(a.ok() && b.ok());
  const std::string sa = a->SecretKeyText(), sb = b->SecretKeyText();
  // a's seed with b's public half.
  std::string seed_a, seed_b;
  ASSERT_TRUE(absl::Base64Unescape(sa.substr(2), &seed_a));
  ASSERT_TRUE(absl::Base64Unescape(sb.substr(2), &seed_b));
  const std::string spliced = "k:" + absl::Base64Escape(seed_a.substr(0, 32) + seed_b.substr(32));
  absl::StatusOr<SigningKey> bad = SigningKey::Parse(spliced);
  ASSERT_FALSE(bad.ok());
  EXPECT_FALSE(absl::StrContains(bad.status().message(), spliced.substr(2, 10)));
  EXPECT_TRUE(SigningKey::Parse(sa).ok());
  EXPECT_FALSE(SigningKey::Parse("k:short").ok());
}

}  // namespace
}  // namespace kiln
