#include "common/source_archive.h"

#include <archive.h>
#include <archive_entry.h>
#include <sys/stat.h>

#include <filesystem>

#include <gtest/gtest.h>

#include "common/digest.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {
namespace fs = std::filesystem;
using testing::ReadFileOrDie;
using testing::TempDir;
using testing::WriteFileOrDie;

// Builds a tar.gz with hand-made entries, to feed the unpacker hostile input.
std::string MakeTar(const std::vector<std::tuple<std::string, int, std::string>>& entries) {
  std::string out;
  struct archive* a = archive_write_new();
  archive_write_add_filter_gzip(a);
  archive_write_set_format_pax_restricted(a);
  archive_write_open2(
      a, &out, nullptr,
      [](struct archive*, void* c, const void* b, size_t n) -> la_ssize_t {
        static_cast<std::string*>(c)->append(static_cast<const char*>(b), n);
        return static_cast<la_ssize_t>(n);
      },
      nullptr, nullptr);
  for (const auto& [name, type, data] : entries) {
    struct archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, name.c_str());
    archive_entry_set_filetype(e, type);
    archive_entry_set_perm(e, 0644);
    if (type == AE_IFLNK) archive_entry_set_symlink(e, data.c_str());
    if (type == AE_IFREG) archive_entry_set_size(e, static_cast<la_int64_t>(data.size()));
    archive_write_header(a, e);
    if (type == AE_IFREG) archive_write_data(a, data.data(), data.size());
    archive_entry_free(e);
  }
  archive_write_close(a);
  archive_write_free(a);
  return out;
}

TEST(SourceArchiveTest, RoundTripKeepsFilesModesAndLinks) {
  TempDir src, dst;
  WriteFileOrDie(src.Sub("flake.nix"), "{ outputs = _: {}; }\n");
  WriteFileOrDie(src.Sub("bin/run"), "#!/bin/sh\n");
  ::chmod(src.Sub("bin/run").c_str(), 0755);
  fs::create_symlink("bin/run", src.Sub("link"));
  WriteFileOrDie(src.Sub(".git/HEAD"), "ref: x\n");

  auto archive = PackDirectory(src.path());
  ASSERT_TRUE(archive.ok()) << archive.status();
  ASSERT_TRUE(UnpackArchive(*archive, dst.path()).ok());
  EXPECT_EQ(ReadFileOrDie(dst.Sub("flake.nix")), "{ outputs = _: {}; }\n");
  EXPECT_TRUE(fs::status(dst.Sub("bin/run")).permissions() != fs::perms::none);
  EXPECT_NE(fs::status(dst.Sub("bin/run")).permissions() & fs::perms::owner_exec, fs::perms::none);
  EXPECT_EQ(fs::status(dst.Sub("flake.nix")).permissions() & fs::perms::owner_exec, fs::perms::none);
  EXPECT_EQ(fs::read_symlink(dst.Sub("link")), "bin/run");
  EXPECT_FALSE(fs::exists(dst.Sub(".git")));
}

TEST(SourceArchiveTest, SameTreeGivesSameDigest) {
  TempDir a, b;
  for (auto* d : {&a, &b}) {
    WriteFileOrDie(d->Sub("flake.nix"), "x");
    WriteFileOrDie(d->Sub("sub/file"), "y");
  }
  auto pa = PackDirectory(a.path());
  auto pb = PackDirectory(b.path());
  ASSERT_TRUE(pa.ok() && pb.ok());
  EXPECT_EQ(Sha256Hex(*pa), Sha256Hex(*pb));
  WriteFileOrDie(b.Sub("sub/file"), "z");
  EXPECT_NE(Sha256Hex(*pa), Sha256Hex(*PackDirectory(b.path())));
}

TEST(SourceArchiveTest, RefusesEntriesThatEscape) {
  TempDir dst;
  for (const auto& entries : std::vector<std::vector<std::tuple<std::string, int, std::string>>>{
           {{"../evil", AE_IFREG, "x"}},
           {{"a/../../evil", AE_IFREG, "x"}},
           {{"/etc/evil", AE_IFREG, "x"}},
           {{"link", AE_IFLNK, "/etc/passwd"}},
           {{"sub/link", AE_IFLNK, "../../outside"}},
       }) {
    TempDir d;
    EXPECT_FALSE(UnpackArchive(MakeTar(entries), d.path()).ok()) << std::get<0>(entries[0]);
  }
  EXPECT_FALSE(fs::exists("/etc/evil"));
  // A link that stays inside is fine.
  EXPECT_TRUE(UnpackArchive(MakeTar({{"a/file", AE_IFREG, "x"}, {"b/link", AE_IFLNK, "../a/file"}}), dst.path()).ok());
}

TEST(SourceArchiveTest, EnforcesLimits) {
  TempDir src, dst;
  WriteFileOrDie(src.Sub("big"), std::string(1 << 20, 'x'));
  WriteFileOrDie(src.Sub("other"), "y");
  ArchiveLimits tiny;
  tiny.max_entries = 1;
  EXPECT_EQ(PackDirectory(src.path(), tiny).status().code(), absl::StatusCode::kResourceExhausted);
  auto archive = PackDirectory(src.path());
  ASSERT_TRUE(archive.ok());
  ArchiveLimits small;
  small.max_unpacked_bytes = 1000;
  EXPECT_EQ(UnpackArchive(*archive, dst.path(), small).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(UnpackArchive("not an archive", dst.path()).ok());
}

}  // namespace
}  // namespace kiln
