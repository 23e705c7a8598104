// ObjectFarmStore over an in-memory bucket (FakeObjectStore) and the real
// RocksDB state: the bucket is a signed binary cache, a narinfo appears
// only after its body and its references, direct uploads are checked
// against what is in the bucket, and collection removes narinfos before
// bodies.
#include "coordinator/object_farm_store.h"

#include <gtest/gtest.h>

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/nar_file.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/fake_object_store.h"
#include "tests/support/nar_builder.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

constexpr char kObjA[] = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
constexpr char kObjB[] = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";

absl::Status AddNar(FarmStore& store, const NarInfo& info, const std::string& nar) {
  size_t at = 0;
  return store.Add(info, [&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min(size, nar.size() - at);
    std::memcpy(buf, nar.data() + at, n);
    at += n;
    return n;
  });
}

// What a worker does for a direct upload: compresses the NAR itself.
CompressedNar Compress(const testing::TempDir& dir, const std::string& nar) {
  absl::StatusOr<std::unique_ptr<NarFileWriter>> writer = NarFileWriter::Create(dir.path());
  EXPECT_TRUE(writer.ok());
  EXPECT_TRUE((*writer)->Write(nar).ok());
  absl::StatusOr<CompressedNar> done = (*writer)->Finish(false);
  EXPECT_TRUE(done.ok());
  return *done;
}

class ObjectFarmStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<SigningKey> key = SigningKey::Generate("kiln-test-1");
    ASSERT_TRUE(key.ok());
    key_ = *key;
    auto opened = RocksDbStateStore::Open(dir_.Sub("rocksdb"), /*sync=*/false);
    ASSERT_TRUE(opened.ok()) << opened.status();
    state_ = *std::move(opened);
    auto bucket = std::make_unique<testing::FakeObjectStore>();
    bucket_ = bucket.get();
    ASSERT_TRUE(state_->UseObjectStorage(std::move(bucket), key_).ok());
  }
  FarmStore& store() { return *state_->farm_store(); }
  std::string Object(const std::string& key) {
    auto objects = bucket_->objects();
    auto it = objects.find(key);
    return it == objects.end() ? "" : it->second;
  }
  NarInfo Direct(const NarInfo& announced, const CompressedNar& nar) {
    NarInfo info = announced;
    info.url = absl::StrCat("nar/", nar.name);
    info.file_hash = nar.file_hash;
    info.file_size = nar.file_size;
    info.compression = "zstd";
    return info;
  }

  testing::TempDir dir_;
  SigningKey key_;
  std::unique_ptr<RocksDbStateStore> state_;
  testing::FakeObjectStore* bucket_ = nullptr;
};

TEST_F(ObjectFarmStoreTest, TheBucketIsASignedBinaryCache) {
  EXPECT_TRUE(absl::StrContains(Object("nix-cache-info"), "StoreDir: /nix/store")) << "written at Open";
  const std::string nar = testing::NarArchive(testing::NarFile("hello\n"));
  ASSERT_TRUE(AddNar(store(), testing::Announce(kObjA, nar), nar).ok());
  absl::StatusOr<NarInfo> held = store().Get("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
  ASSERT_TRUE(held.ok()) << held.status();
  // The narinfo in the bucket: the same path, signed by the farm's key.
  absl::StatusOr<NarInfo> in_bucket = ParseNarInfo(Object("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.narinfo"));
  ASSERT_TRUE(in_bucket.ok()) << in_bucket.status();
  EXPECT_EQ(in_bucket->nar_hash, held->nar_hash);
  ASSERT_EQ(in_bucket->sigs.size(), 1u);
  EXPECT_TRUE(VerifySignature(in_bucket->Fingerprint(), in_bucket->sigs[0], {key_.PublicKeyText()}));
  // Its body, named as the narinfo says, before the narinfo.
  EXPECT_EQ(Object(in_bucket->url).size(), in_bucket->file_size);
  const std::vector<std::string> log = bucket_->log();
  ASSERT_GE(log.size(), 3u);
  EXPECT_EQ(log[1], "PUT " + in_bucket->url);
  EXPECT_EQ(log[2], "PUT aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.narinfo");
  // Readers are sent to the bucket, or get the bytes through the store.
  absl::StatusOr<NarLocation> location = store().LocateNar(in_bucket->url.substr(4));
  ASSERT_TRUE(location.ok());
  EXPECT_EQ(location->url, "fake://GET/" + in_bucket->url);
  std::string read;
  ASSERT_TRUE(store()
                  .ReadNar(in_bucket->url.substr(4),
                           [&](absl::string_view p) {
                             read.append(p.data(), p.size());
                             return absl::OkStatus();
                           })
                  .ok());
  EXPECT_EQ(read, Object(in_bucket->url));
  EXPECT_TRUE(absl::IsNotFound(store().LocateNar("../secrets").status()));
}

TEST_F(ObjectFarmStoreTest, AReferenceMustBeThereFirstAndNothingIsPublishedOtherwise) {
  const std::string a = testing::NarArchive(testing::NarFile("a"));
  const std::string b = testing::NarArchive(testing::NarFile("b"));
  const absl::Status refused = AddNar(store(), testing::Announce(kObjB, b, {kObjA}), b);
  EXPECT_TRUE(absl::IsFailedPrecondition(refused)) << refused;
  EXPECT_EQ(bucket_->objects().size(), 1u) << "only nix-cache-info";
  ASSERT_TRUE(AddNar(store(), testing::Announce(kObjA, a), a).ok());
  ASSERT_TRUE(AddNar(store(), testing::Announce(kObjB, b, {kObjA}), b).ok());
  EXPECT_TRUE(store().Missing({kObjA, kObjB})->empty());
}

TEST_F(ObjectFarmStoreTest, ANarinfoThatCannotBeWrittenLeavesNoValidPath) {
  const std::string a = testing::NarArchive(testing::NarFile("a"));
  bucket_->FailPutsOf("aaaa");
  EXPECT_FALSE(AddNar(store(), testing::Announce(kObjA, a), a).ok());
  EXPECT_EQ(*store().Missing({kObjA}), std::vector<std::string>{kObjA});
  bucket_->FailPutsOf("");
  EXPECT_TRUE(AddNar(store(), testing::Announce(kObjA, a), a).ok()) << "the next upload succeeds";
  EXPECT_TRUE(store().Missing({kObjA})->empty());
}

TEST_F(ObjectFarmStoreTest, DirectUploadsAreCommittedOnlyWhenTheirBodyIsInTheBucket) {
  ASSERT_TRUE(store().TakesDirectUploads());
  const std::string nar = testing::NarArchive(testing::NarFile(std::string(5000, 'q')));
  const CompressedNar compressed = Compress(dir_, nar);
  const NarInfo info = Direct(testing::Announce(kObjA, nar), compressed);
  absl::StatusOr<std::string> url = store().DirectUploadUrl(info);
  ASSERT_TRUE(url.ok()) << url.status();
  EXPECT_EQ(*url, "fake://PUT/" + info.url);
  // A name that is not the body's hash, or not a NAR's name: refused.
  NarInfo misnamed = info;
  misnamed.url = "nar/../../nix-cache-info";
  EXPECT_TRUE(absl::IsInvalidArgument(store().DirectUploadUrl(misnamed).status()));
  misnamed = info;
  misnamed.file_hash = testing::Announce(kObjA, "other").nar_hash;
  EXPECT_TRUE(absl::IsInvalidArgument(store().DirectUploadUrl(misnamed).status()));

  // The worker died before its PUT (or a crash came between body and
  // narinfo): nothing is valid, nothing is published.
  absl::Status early = store().CommitDirectUpload(info);
  EXPECT_TRUE(absl::IsFailedPrecondition(early)) << early;
  EXPECT_EQ(Object("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.narinfo"), "");
  // A cut-short body: refused.
  const std::string body = testing::ReadFileOrDie(compressed.file);
  ASSERT_TRUE(bucket_->Put(info.url, body.substr(0, body.size() / 2), "").ok());
  EXPECT_TRUE(absl::IsDataLoss(store().CommitDirectUpload(info)));
  EXPECT_EQ(*store().Missing({kObjA}), std::vector<std::string>{kObjA});
  // The whole body: committed, published, signed.
  ASSERT_TRUE(bucket_->Put(info.url, body, "").ok());
  ASSERT_TRUE(store().CommitDirectUpload(info).ok());
  EXPECT_TRUE(store().Missing({kObjA})->empty());
  absl::StatusOr<NarInfo> in_bucket = ParseNarInfo(Object("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.narinfo"));
  ASSERT_TRUE(in_bucket.ok());
  EXPECT_EQ(in_bucket->file_size, body.size());
  EXPECT_EQ(in_bucket->nar_size, nar.size());
  EXPECT_TRUE(VerifySignature(in_bucket->Fingerprint(), in_bucket->sigs.at(0), {key_.PublicKeyText()}));
  EXPECT_EQ(store().Stats().paths, 1u);
  ::unlink(compressed.file.c_str());
}

TEST_F(ObjectFarmStoreTest, CollectionRemovesNarinfosBeforeBodies) {
  const std::string a = testing::NarArchive(testing::NarFile(std::string(3000, 'a') + "1"));
  const std::string b = testing::NarArchive(testing::NarFile(std::string(3000, 'b') + "2"));
  ASSERT_TRUE(AddNar(store(), testing::Announce(kObjA, a), a).ok());
  ASSERT_TRUE(AddNar(store(), testing::Announce(kObjB, b, {kObjA}), b).ok());
  const std::string a_body = store().Get("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")->url;
  FarmGcPolicy policy;
  policy.max_bytes = 1;
  policy.target_bytes = 0;
  absl::StatusOr<FarmGcReport> report = store().CollectGarbage(policy);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->paths_collected, 2u);
  EXPECT_EQ(bucket_->objects().size(), 1u) << "only nix-cache-info";
  const std::vector<std::string> log = bucket_->log();
  const auto at = [&](const std::string& entry) { return std::find(log.begin(), log.end(), entry) - log.begin(); };
  EXPECT_LT(at("DELETE aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.narinfo"), at("DELETE " + a_body));
  EXPECT_LT(at("DELETE bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.narinfo"), at("DELETE " + a_body));
  EXPECT_EQ(*store().Missing({kObjA, kObjB}), (std::vector<std::string>{kObjA, kObjB}));
}

}  // namespace
}  // namespace kiln
