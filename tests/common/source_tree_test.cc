#include "common/source_tree.h"

#include <sys/stat.h>

#include <filesystem>

#include <gtest/gtest.h>

#include "tests/support/test_util.h"

namespace kiln {
namespace {
namespace fs = std::filesystem;
using kiln::v1::Digest;
using kiln::v1::Directory;
using testing::ReadFileOrDie;
using testing::StatusIs;
using testing::TempDir;
using testing::WriteFileOrDie;

BlobLookup LookupIn(const absl::flat_hash_map<std::string, std::string>& blobs) {
  return [&blobs](const std::string& hash) -> const std::string* {
    auto it = blobs.find(hash);
    return it == blobs.end() ? nullptr : &it->second;
  };
}

// A hand-made tree: `root` plus its blobs, to feed the checks hostile input.
struct HandTree {
  absl::flat_hash_map<std::string, std::string> blobs;
  Digest Add(const std::string& data) {
    Digest d = DigestOf(data);
    blobs[d.hash()] = data;
    return d;
  }
  Digest AddDir(const Directory& dir) { return Add(SerializeDirectory(dir)); }
};

TEST(SourceTreeTest, RoundTripKeepsFilesModesAndLinks) {
  TempDir src, dst;
  WriteFileOrDie(src.Sub("flake.nix"), "{ outputs = _: {}; }\n");
  WriteFileOrDie(src.Sub("bin/run"), "#!/bin/sh\n");
  ::chmod(src.Sub("bin/run").c_str(), 0755);
  fs::create_symlink("bin/run", src.Sub("link"));
  WriteFileOrDie(src.Sub(".git/HEAD"), "ref: x\n");
  fs::create_directories(src.Sub("empty"));

  absl::StatusOr<SourceTree> tree = BuildSourceTree(src.path());
  ASSERT_TRUE(tree.ok()) << tree.status();
  ASSERT_TRUE(MaterializeTree(tree->root, LookupIn(tree->blobs), dst.path()).ok());
  EXPECT_EQ(ReadFileOrDie(dst.Sub("flake.nix")), "{ outputs = _: {}; }\n");
  EXPECT_NE(fs::status(dst.Sub("bin/run")).permissions() & fs::perms::owner_exec, fs::perms::none);
  EXPECT_EQ(fs::status(dst.Sub("flake.nix")).permissions() & fs::perms::owner_exec, fs::perms::none);
  EXPECT_EQ(fs::read_symlink(dst.Sub("link")), "bin/run");
  EXPECT_TRUE(fs::is_directory(dst.Sub("empty")));
  EXPECT_FALSE(fs::exists(dst.Sub(".git")));
}

TEST(SourceTreeTest, DigestDependsOnContentNamesAndModesOnly) {
  TempDir a, b;
  for (auto* d : {&a, &b}) {
    WriteFileOrDie(d->Sub("flake.nix"), "x");
    WriteFileOrDie(d->Sub("sub/file"), "y");
  }
  auto ta = BuildSourceTree(a.path());
  auto tb = BuildSourceTree(b.path());
  ASSERT_TRUE(ta.ok() && tb.ok());
  EXPECT_EQ(ta->root.hash(), tb->root.hash());
  // Identical content is one blob.
  WriteFileOrDie(b.Sub("sub/file"), "x");
  tb = BuildSourceTree(b.path());
  EXPECT_NE(ta->root.hash(), tb->root.hash());
  EXPECT_EQ(tb->blobs.size(), 3u);  // "x", the sub directory, the root.
  ::chmod(b.Sub("flake.nix").c_str(), 0755);
  EXPECT_NE(tb->root.hash(), BuildSourceTree(b.path())->root.hash());
}

TEST(SourceTreeTest, ListsEveryBlobOnceAndNamesAMissingOne) {
  TempDir src;
  WriteFileOrDie(src.Sub("flake.nix"), "same");
  WriteFileOrDie(src.Sub("a/copy"), "same");
  WriteFileOrDie(src.Sub("a/other"), "other");
  auto tree = BuildSourceTree(src.path());
  ASSERT_TRUE(tree.ok());
  auto listed = ListTreeBlobs(tree->root, LookupIn(tree->blobs));
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->size(), tree->blobs.size());
  EXPECT_EQ(listed->front(), tree->root.hash());

  tree->blobs.erase(DigestOf("other").hash());
  EXPECT_THAT(ListTreeBlobs(tree->root, LookupIn(tree->blobs)).status(),
              StatusIs(absl::StatusCode::kNotFound, "a/other"));
}

TEST(SourceTreeTest, RefusesABlobThatDoesNotMatchItsDigest) {
  HandTree t;
  Directory root;
  auto* f = root.add_files();
  f->set_name("flake.nix");
  *f->mutable_digest() = t.Add("good");
  Digest r = t.AddDir(root);
  t.blobs[DigestOf("good").hash()] = "evil";
  TempDir dst;
  EXPECT_THAT(MaterializeTree(r, LookupIn(t.blobs), dst.path()),
              StatusIs(absl::StatusCode::kInvalidArgument, "does not match its digest"));
}

TEST(SourceTreeTest, RefusesNamesThatEscapeOrRepeat) {
  for (const std::string& name : std::vector<std::string>{"..", ".", "", "a/b", std::string("a\0b", 3)}) {
    HandTree t;
    Directory root;
    auto* f = root.add_files();
    f->set_name(name);
    *f->mutable_digest() = t.Add("x");
    TempDir dst;
    EXPECT_THAT(MaterializeTree(t.AddDir(root), LookupIn(t.blobs), dst.path()),
                StatusIs(absl::StatusCode::kInvalidArgument, "not a plain file name"))
        << name;
  }
  HandTree t;
  Directory root;
  for (const char* name : {"b", "a"}) {
    auto* f = root.add_files();
    f->set_name(name);
    *f->mutable_digest() = t.Add("x");
  }
  EXPECT_THAT(ListTreeBlobs(t.AddDir(root), LookupIn(t.blobs)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "not sorted"));
  Directory twice;
  auto* f = twice.add_files();
  f->set_name("a");
  *f->mutable_digest() = t.Add("x");
  auto* l = twice.add_symlinks();
  l->set_name("a");
  l->set_target("b");
  EXPECT_THAT(ListTreeBlobs(t.AddDir(twice), LookupIn(t.blobs)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "twice"));
}

TEST(SourceTreeTest, RefusesLinksLeadingOutside) {
  struct Case {
    std::string target;
    bool ok;
  };
  // The link lives in sub/, one level below the root.
  for (const Case& c : {Case{"../flake.nix", true}, Case{"./x/../../y", true}, Case{"../../etc/passwd", false},
                        Case{"/etc/passwd", false}, Case{"x/../../..", false}}) {
    HandTree t;
    Directory sub;
    auto* l = sub.add_symlinks();
    l->set_name("link");
    l->set_target(c.target);
    Directory root;
    auto* d = root.add_directories();
    d->set_name("sub");
    *d->mutable_digest() = t.AddDir(sub);
    TempDir dst;
    absl::Status s = MaterializeTree(t.AddDir(root), LookupIn(t.blobs), dst.path());
    EXPECT_EQ(s.ok(), c.ok) << c.target << ": " << s;
  }
}

TEST(SourceTreeTest, EnforcesLimits) {
  TempDir src;
  WriteFileOrDie(src.Sub("a/b/c/d/flake.nix"), std::string(1000, 'x'));
  EXPECT_THAT(BuildSourceTree(src.path(), {.max_depth = 2}).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "deeper than 2"));
  EXPECT_THAT(BuildSourceTree(src.path(), {.max_total_bytes = 500}).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "larger than"));
  auto tree = BuildSourceTree(src.path());
  ASSERT_TRUE(tree.ok());
  EXPECT_THAT(ListTreeBlobs(tree->root, LookupIn(tree->blobs), {.max_depth = 3}).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "deeper than 3"));
  EXPECT_THAT(ListTreeBlobs(tree->root, LookupIn(tree->blobs), {.max_total_bytes = 999}).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "larger than"));
  EXPECT_THAT(ListTreeBlobs(tree->root, LookupIn(tree->blobs), {.max_entries = 3}).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "more than 3 entries"));
}

}  // namespace
}  // namespace kiln
