// SubmissionValidator on its own: what a buildset must satisfy before
// anything is stored. The CAS is a fake at the BlobStore seam (a map).
#include "coordinator/submission_validator.h"

#include <gtest/gtest.h>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "common/digest.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::StatusIs;

// A fake BlobStore: directories' metas and blobs in maps; Put stores
// without checking children.
class FakeBlobStore final : public BlobStore {
 public:
  absl::StatusOr<kiln::state::v1::BlobMeta> Meta(const std::string& hash) const override {
    auto it = meta.find(hash);
    if (it == meta.end()) return absl::NotFoundError(hash);
    return it->second;
  }
  bool HasDirectory(const kiln::v1::Digest& digest) const override {
    auto it = meta.find(digest.hash());
    return it != meta.end() && it->second.is_directory();
  }
  absl::StatusOr<std::string> ReadAll(const std::string& hash) const override {
    auto it = blobs.find(hash);
    if (it == blobs.end()) return absl::NotFoundError(hash);
    return it->second;
  }
  absl::Status Put(const kiln::v1::Digest& digest, absl::string_view data, bool is_directory, bool* stored) override {
    blobs[digest.hash()] = std::string(data);
    meta[digest.hash()].set_is_directory(is_directory);
    meta[digest.hash()].set_size_bytes(static_cast<int64_t>(data.size()));
    if (stored != nullptr) *stored = true;
    return absl::OkStatus();
  }
  uint64_t total_bytes() const override { return 0; }
  absl::StatusOr<uint64_t> CollectGarbage(const absl::flat_hash_set<std::string>&, int64_t, uint64_t) override {
    return 0;
  }
  absl::flat_hash_map<std::string, kiln::state::v1::BlobMeta> meta;
  absl::flat_hash_map<std::string, std::string> blobs;
};

constexpr char kFlake[] = "{ outputs = { self }: { }; }";

kiln::v1::SubmitBuildRequest Request(int targets = 1) {
  std::vector<std::string> attrs;
  for (int i = 0; i < targets; ++i) attrs.push_back(absl::StrCat("packages.x86_64-linux.p", i));
  return testing::OneFileFlakeSubmission(kFlake, attrs);
}

TEST(SubmissionValidator, AcceptsASoundSubmissionAndListsWhatToStore) {
  SubmissionValidator without_cas({}, nullptr);
  kiln::v1::SubmitBuildRequest request = Request(2);
  absl::StatusOr<CheckedSubmission> checked = without_cas.Check(request, "", 0, nullptr);
  ASSERT_TRUE(checked.ok()) << checked.status();
  EXPECT_EQ(checked->blobs.size(), 2u) << "the flake and its directory, once for both targets";
  EXPECT_TRUE(checked->inline_trees.empty());
  EXPECT_NE(checked->Lookup()(request.blobs(0).digest().hash()), nullptr);

  FakeBlobStore cas;
  SubmissionValidator with_cas({}, &cas);
  checked = with_cas.Check(request, "", 0, nullptr);
  ASSERT_TRUE(checked.ok()) << checked.status();
  EXPECT_TRUE(checked->blobs.empty());
  ASSERT_EQ(checked->inline_trees.size(), 1u);
  EXPECT_EQ(checked->inline_trees[0].second.size(), 2u);
}

TEST(SubmissionValidator, RefusesCountsSizesAndQuotasPastTheirLimits) {
  SubmissionValidator v({.max_source_bytes = 1 << 20, .max_targets = 3, .max_active_jobs_per_token = 5}, nullptr);
  EXPECT_THAT(v.Check(kiln::v1::SubmitBuildRequest(), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "no build targets"));
  EXPECT_THAT(v.Check(Request(4), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "the limit is 3"));
  EXPECT_THAT(v.Check(Request(2), "ci", 4, nullptr).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "token 'ci' has 4 job(s)"));
  EXPECT_TRUE(v.Check(Request(2), "", 4, nullptr).ok()) << "no token, no quota";
  kiln::v1::SubmitBuildRequest big = Request();
  big.add_blobs()->set_data(std::string(2 << 20, 'x'));
  EXPECT_THAT(v.Check(big, "", 0, nullptr).status(), StatusIs(absl::StatusCode::kResourceExhausted, "1 MiB"));
}

TEST(SubmissionValidator, EveryBlobMustMatchItsDigestAndEveryTreeBeComplete) {
  SubmissionValidator v({}, nullptr);
  kiln::v1::SubmitBuildRequest tampered = Request();
  tampered.mutable_blobs(0)->mutable_data()->append("!");
  EXPECT_THAT(v.Check(tampered, "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "uploaded source blob"));
  kiln::v1::SubmitBuildRequest missing = Request();
  missing.mutable_blobs()->erase(missing.mutable_blobs()->begin());  // The flake file.
  EXPECT_FALSE(v.Check(missing, "", 0, nullptr).ok());
}

TEST(SubmissionValidator, AnUploadedTreeMustBeADirectoryOfTheStatedSizeWithinTheTreeLimit) {
  FakeBlobStore cas;
  SubmissionValidator v({.max_tree_bytes = 1000}, &cas);
  kiln::v1::SubmitBuildRequest request = Request();
  request.clear_blobs();  // The tree is to be found in the CAS.
  const kiln::v1::Digest root = request.targets(0).spec().source().tree_root();
  EXPECT_THAT(v.Check(request, "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kNotFound, "is neither uploaded nor sent"));
  kiln::state::v1::BlobMeta& meta = cas.meta[root.hash()];
  meta.set_is_directory(true);
  meta.set_size_bytes(root.size_bytes());
  meta.set_tree_bytes(500);
  meta.set_tree_entries(1);
  meta.set_tree_depth(1);
  EXPECT_TRUE(v.Check(request, "", 0, nullptr).ok());
  meta.set_tree_bytes(5000);
  EXPECT_FALSE(v.Check(request, "", 0, nullptr).ok());
  meta.set_tree_bytes(500);
  meta.set_size_bytes(root.size_bytes() + 1);
  EXPECT_THAT(v.Check(request, "", 0, nullptr).status(), StatusIs(absl::StatusCode::kNotFound));
}

TEST(SubmissionValidator, RefusesBadTargetsNamingWhatToChange) {
  SubmissionValidator v({.push_allow = {"rg.example.eu/team/*:testing"}}, nullptr);
  auto with = [](auto change) {
    kiln::v1::SubmitBuildRequest r = Request();
    change(*r.mutable_targets(0)->mutable_spec());
    return r;
  };
  EXPECT_THAT(v.Check(with([](auto& s) { s.mutable_source()->set_flake_subdir("../x"); }), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "leaves the source tree"));
  EXPECT_THAT(v.Check(with([](auto& s) { s.mutable_requirements()->clear_system(); }), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "no system"));
  EXPECT_THAT(v.Check(with([](auto& s) { s.set_priority_class("urgent"); }), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "interactive, ci, batch"));
  EXPECT_TRUE(v.Check(with([](auto& s) { s.set_priority_class("batch"); }), "", 0, nullptr).ok());
  EXPECT_EQ(v.PriorityOf("batch"), kiln::v1::PRIORITY_BATCH);
  auto push_to = [&](const std::string& repository, const std::string& tag) {
    return with([&](auto& s) {
      s.mutable_push()->set_repository(repository);
      s.mutable_push()->add_tags(tag);
    });
  };
  EXPECT_TRUE(v.Check(push_to("rg.example.eu/team/api", "testing"), "", 0, nullptr).ok());
  EXPECT_THAT(v.Check(push_to("rg.example.eu/team/api", "production"), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kPermissionDenied, "is not allowed by this coordinator"));
  EXPECT_THAT(v.Check(push_to("rg.example.eu/team/api", "bad tag"), "", 0, nullptr).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SubmissionValidator, WhatNoKnownWorkerCouldBuildIsRefusedOnlyWhenAsked) {
  SubmissionValidator v({}, nullptr);
  Scheduler workers;
  WorkerCapabilities arm;
  arm.systems = {"aarch64-linux"};
  workers.AddWorker("arm", arm);
  const kiln::v1::SubmitBuildRequest request = Request();
  EXPECT_THAT(v.Check(request, "", 0, &workers).status(), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_TRUE(v.Check(request, "", 0, nullptr).ok()) << "in the start-up grace window, no worker check";
  WorkerCapabilities x86;
  x86.systems = {"x86_64-linux"};
  workers.AddWorker("x86", x86);
  EXPECT_TRUE(v.Check(request, "", 0, &workers).ok());
}

}  // namespace
}  // namespace kiln
