// LocalFarmStore on the real RocksDB state in a temporary directory, with
// NARs built by hand: what it accepts, what it refuses (and leaves nothing
// of), concurrent uploads of one path, and what a crash mid-upload leaves.
#include "coordinator/farm_store.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <atomic>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/escaping.h"
#include "common/digest.h"
#include "common/nix_hash.h"
#include "coordinator/binary_cache_server.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/nar_builder.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

constexpr char kA[] = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
constexpr char kB[] = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";

using testing::Announce;

// `*read`, when given: how many bytes of the NAR the store read.
absl::Status AddFromMemory(FarmStore& store, const NarInfo& info, const std::string& nar, size_t step = 7,
                           size_t* read = nullptr) {
  size_t local = 0;
  size_t& at = read != nullptr ? *read : local;
  at = 0;
  return store.Add(info, [&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min({size, step, nar.size() - at});
    std::memcpy(buf, nar.data() + at, n);
    at += n;
    return n;
  });
}

class FarmStoreTest : public ::testing::Test {
 protected:
  void SetUp() override { Open(); }
  void Open() {
    state_.reset();
    auto opened = RocksDbStateStore::Open(dir_.Sub("rocksdb"), /*sync=*/false);
    ASSERT_TRUE(opened.ok()) << opened.status();
    state_ = *std::move(opened);
  }
  FarmStore& store() { return *state_->farm_store(); }
  std::vector<std::string> NarFiles() {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_.Sub("rocksdb/nar"))) out.push_back(e.path().filename().string());
    return out;
  }

  testing::TempDir dir_;
  std::unique_ptr<RocksDbStateStore> state_;
};

TEST_F(FarmStoreTest, AddsAPathAndServesItsNarInfoAndBody) {
  const std::string nar = testing::NarArchive(testing::NarFile("hello\n"));
  ASSERT_TRUE(AddFromMemory(store(), Announce(kA, nar), nar).ok());
  absl::StatusOr<NarInfo> info = store().Get("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->store_path, kA);
  EXPECT_EQ(info->nar_size, nar.size());
  EXPECT_EQ(info->compression, "zstd");
  EXPECT_TRUE(absl::StartsWith(info->url, "nar/") && absl::EndsWith(info->url, ".nar.zst")) << info->url;
  absl::StatusOr<NarLocation> location = store().LocateNar(info->url.substr(4));
  ASSERT_TRUE(location.ok()) << location.status();
  const std::string* file = &location->file;
  EXPECT_EQ(fs::file_size(*file), info->file_size);
  EXPECT_EQ(absl::StrCat("sha256:",
                         [&] {
                           NixHash h;
                           h.bytes = absl::HexStringToBytes(Sha256Hex(testing::ReadFileOrDie(*file)));
                           return h.Base32();
                         }()),
            info->file_hash);
  EXPECT_TRUE(store().Missing({kA})->empty());
  EXPECT_EQ(*store().Missing({kA, kB}), std::vector<std::string>{kB});
  EXPECT_TRUE(absl::IsNotFound(store().LocateNar("../../etc/passwd").status()));
  EXPECT_TRUE(absl::IsNotFound(store().Get("../x").status()));
}

TEST_F(FarmStoreTest, ANarUnlikeItsAnnouncementOrMalformedLeavesNothing) {
  const std::string nar = testing::NarArchive(testing::NarFile("hello\n"));
  NarInfo wrong = Announce(kA, nar);
  wrong.nar_size += 1;
  absl::Status s = AddFromMemory(store(), wrong, nar);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  const std::string bad = testing::NarArchive(testing::NarDirectory({{"..", testing::NarFile("x")}}));
  s = AddFromMemory(store(), Announce(kA, bad), bad);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "an entry named '..'")) << s;
  EXPECT_EQ(*store().Missing({kA}), std::vector<std::string>{kA});
  EXPECT_TRUE(NarFiles().empty());
}

TEST_F(FarmStoreTest, APathWaitsForWhatItReferences) {
  const std::string a = testing::NarArchive(testing::NarFile("a")), b = testing::NarArchive(testing::NarFile(kA));
  const NarInfo b_info = Announce(kB, b, {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"});
  EXPECT_TRUE(absl::IsFailedPrecondition(AddFromMemory(store(), b_info, b)));
  ASSERT_TRUE(AddFromMemory(store(), Announce(kA, a), a).ok());
  ASSERT_TRUE(AddFromMemory(store(), b_info, b).ok());  // Its self-reference is no obstacle.
  EXPECT_EQ(store().Get("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")->references.size(), 2u);
}

TEST_F(FarmStoreTest, UploadsOfOnePathAtOnceStoreItOnce) {
  const std::string nar = testing::NarArchive(testing::NarFile(std::string(200000, 'z')));
  const NarInfo info = Announce(kA, nar);
  std::vector<std::thread> uploads;
  std::atomic<int> ok{0}, read_whole{0};
  for (int i = 0; i < 4; ++i) {
    uploads.emplace_back([&] {
      size_t read = 0;
      if (AddFromMemory(store(), info, nar, 4096, &read).ok()) ++ok;
      if (read == nar.size()) ++read_whole;
    });
  }
  for (std::thread& t : uploads) t.join();
  EXPECT_EQ(ok.load(), 4);
  // One upload stored it; the others waited for it and read nothing.
  EXPECT_EQ(read_whole.load(), 1);
  EXPECT_EQ(NarFiles().size(), 1u);
}

TEST_F(FarmStoreTest, AnUploadACrashInterruptedIsGoneAfterARestart) {
  const std::string nar = testing::NarArchive(testing::NarFile("x"));
  ASSERT_TRUE(AddFromMemory(store(), Announce(kA, nar), nar).ok());
  std::ofstream(dir_.Sub("rocksdb/nar/.upload-abc123")) << "half a body";
  Open();
  EXPECT_EQ(NarFiles().size(), 1u);
  EXPECT_TRUE(store().Missing({kA})->empty());
}

TEST_F(FarmStoreTest, SignedNarInfosVerifyAndASecondKeyReplacesOnlyItsOwnSignature) {
  const std::string nar = testing::NarArchive(testing::NarFile("x"));
  ASSERT_TRUE(AddFromMemory(store(), Announce(kA, nar), nar).ok());
  absl::StatusOr<SigningKey> key = SigningKey::Generate("kiln-farm-1");
  ASSERT_TRUE(key.ok());
  absl::StatusOr<NarInfo> signed_info = SignNarInfo(*store().Get("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), *key);
  ASSERT_TRUE(signed_info.ok());
  ASSERT_EQ(signed_info->sigs.size(), 1u);
  EXPECT_TRUE(VerifySignature(signed_info->Fingerprint(), signed_info->sigs[0], {key->PublicKeyText()}));
  absl::StatusOr<NarInfo> again = SignNarInfo(*signed_info, *key);
  EXPECT_EQ(again->sigs.size(), 1u);
}

TEST_F(FarmStoreTest, ABackupHoldsTheNarsAndTheSigningKey) {
  const std::string nar = testing::NarArchive(testing::NarFile("x"));
  ASSERT_TRUE(AddFromMemory(store(), Announce(kA, nar), nar).ok());
  absl::StatusOr<SigningKey> key = LoadOrCreateCacheKey(dir_.path());
  ASSERT_TRUE(key.ok()) << key.status();
  absl::StatusOr<RocksDbStateStore::BackupStats> backup = state_->Backup(dir_.Sub("backup"));
  ASSERT_TRUE(backup.ok()) << backup.status();
  EXPECT_EQ(backup->nar_files, 1u);
  EXPECT_EQ(testing::ReadFileOrDie(dir_.Sub("backup/cache-key.secret")),
            testing::ReadFileOrDie(dir_.Sub("cache-key.secret")));
  EXPECT_EQ(fs::status(dir_.Sub("backup/cache-key.secret")).permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write);
  // The backup is a state directory: opened, it serves the same path.
  state_.reset();
  auto restored = RocksDbStateStore::Open(dir_.Sub("backup/rocksdb"), /*sync=*/false);
  ASSERT_TRUE(restored.ok()) << restored.status();
  absl::StatusOr<NarInfo> info = (*restored)->farm_store()->Get("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE((*restored)->farm_store()->LocateNar(info->url.substr(4)).ok());
  EXPECT_EQ(LoadOrCreateCacheKey(dir_.Sub("backup"))->PublicKeyText(), key->PublicKeyText());
}

}  // namespace
}  // namespace kiln
