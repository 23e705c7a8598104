#include "common/source_tree.h"

#include <sys/stat.h>

#include <chrono>
#include <filesystem>

#include <gtest/gtest.h>

#include "common/subprocess.h"
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

// Runs git in `dir` (the tests need a real git, as the CLI does).
void Git(const std::string& dir, std::vector<std::string> args) {
  args.insert(args.begin(), {"git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"});
  absl::StatusOr<CommandResult> r = RunCommand({.argv = args, .extra_env = {}, .cwd = dir});
  ASSERT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
}

TEST(SourceTreeTest, InsideAGitWorkTreeOnlyTrackedFilesCountWithTheirWorkingContents) {
  TempDir repo;
  WriteFileOrDie(repo.Sub("svc/flake.nix"), "{ outputs = _: {}; }\n");
  WriteFileOrDie(repo.Sub("svc/src/main.go"), "package main\n");
  WriteFileOrDie(repo.Sub("svc/run.sh"), "#!/bin/sh\n");
  ::chmod(repo.Sub("svc/run.sh").c_str(), 0755);
  Git(repo.path(), {"init", "-q"});
  Git(repo.path(), {"add", "svc/flake.nix", "svc/src/main.go", "svc/run.sh"});
  Git(repo.path(), {"commit", "-qm", "init"});
  WriteFileOrDie(repo.Sub("svc/src/main.go"), "package main // edited, not committed\n");
  WriteFileOrDie(repo.Sub("svc/result.log"), "untracked\n");
  WriteFileOrDie(repo.Sub("svc/tmp/scratch"), "untracked too\n");

  absl::StatusOr<std::optional<absl::flat_hash_set<std::string>>> tracked = GitTrackedFiles(repo.Sub("svc"));
  ASSERT_TRUE(tracked.ok() && tracked->has_value());
  EXPECT_EQ(**tracked, (absl::flat_hash_set<std::string>{"flake.nix", "src/main.go", "run.sh"}));
  absl::StatusOr<SourceTree> tree = BuildSourceTree(repo.Sub("svc"), {}, {.only = &**tracked});
  ASSERT_TRUE(tree.ok()) << tree.status();
  TempDir out;
  ASSERT_TRUE(MaterializeTree(tree->root, LookupIn(tree->blobs), out.path()).ok());
  EXPECT_EQ(ReadFileOrDie(out.Sub("src/main.go")), "package main // edited, not committed\n");
  EXPECT_FALSE(fs::exists(out.Sub("result.log")));
  EXPECT_FALSE(fs::exists(out.Sub("tmp")));
  struct stat st;
  ASSERT_EQ(::stat(out.Sub("run.sh").c_str(), &st), 0);
  EXPECT_NE(st.st_mode & 0100, 0u);

  // Outside a work tree: the whole directory.
  TempDir plain;
  WriteFileOrDie(plain.Sub("flake.nix"), "{ }\n");
  tracked = GitTrackedFiles(plain.path());
  ASSERT_TRUE(tracked.ok());
  EXPECT_FALSE(tracked->has_value());
}

TEST(SourceTreeTest, TheDigestCacheSparesReadingUnchangedFilesAndNoticesChanges) {
  TempDir src, cache_dir;
  for (int i = 0; i < 50; ++i) WriteFileOrDie(src.Sub(absl::StrCat("d", i % 5, "/f", i)), absl::StrCat("file ", i));
  // Files written just now are not remembered (their mtime could still
  // hide a change); age them.
  const auto old = fs::file_time_type::clock::now() - std::chrono::minutes(5);
  for (const auto& e : fs::recursive_directory_iterator(src.path())) {
    if (e.is_regular_file()) fs::last_write_time(e.path(), old);
  }
  const std::string cache_file = cache_dir.Sub("digests");
  Digest first_root;
  {
    DigestCache cache(cache_file);
    auto tree = BuildSourceTree(src.path(), {}, {.keep_file_data = false, .digest_cache = &cache});
    ASSERT_TRUE(tree.ok());
    EXPECT_EQ(cache.hits(), 0u);
    EXPECT_EQ(tree->file_paths.size(), 50u);
    ASSERT_TRUE(cache.Save().ok());
    first_root = tree->root;
  }
  {
    DigestCache cache(cache_file);
    auto tree = BuildSourceTree(src.path(), {}, {.keep_file_data = false, .digest_cache = &cache});
    ASSERT_TRUE(tree.ok());
    EXPECT_EQ(cache.hits(), 50u);
    EXPECT_EQ(tree->root.hash(), first_root.hash());
  }
  // A changed file (new size and mtime) is hashed again.
  WriteFileOrDie(src.Sub("d3/f3"), "changed content");
  DigestCache cache(cache_file);
  auto tree = BuildSourceTree(src.path(), {}, {.keep_file_data = false, .digest_cache = &cache});
  ASSERT_TRUE(tree.ok());
  EXPECT_EQ(cache.hits(), 49u);
  EXPECT_NE(tree->root.hash(), first_root.hash());
  EXPECT_TRUE(tree->file_paths.contains(DigestOf("changed content").hash()));
}

TEST(SourceTreeTest, FindsASubdirectorysDigestAndNamesWhatIsMissing) {
  TempDir src;
  WriteFileOrDie(src.Sub("services/api/flake.nix"), "{ }\n");
  WriteFileOrDie(src.Sub("services/notes.txt"), "not a directory\n");
  absl::StatusOr<SourceTree> tree = BuildSourceTree(src.path());
  ASSERT_TRUE(tree.ok());
  absl::StatusOr<SourceTree> api = BuildSourceTree(src.Sub("services/api"));
  ASSERT_TRUE(api.ok());
  const BlobLookup lookup = LookupIn(tree->blobs);
  EXPECT_EQ(FindSubtree(tree->root, "services/api", lookup)->hash(), api->root.hash());
  EXPECT_EQ(FindSubtree(tree->root, "./services//api/", lookup)->hash(), api->root.hash());
  EXPECT_EQ(FindSubtree(tree->root, "", lookup)->hash(), tree->root.hash());
  EXPECT_TRUE(absl::IsNotFound(FindSubtree(tree->root, "services/web", lookup).status()));
  EXPECT_TRUE(absl::IsNotFound(FindSubtree(tree->root, "services/notes.txt", lookup).status()));
  const BlobLookup empty = [](const std::string&) -> const std::string* { return nullptr; };
  EXPECT_EQ(FindSubtree(tree->root, "services", empty).status().code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace kiln
