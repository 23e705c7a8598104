// DirectUploadClient over a fake farm-store client (named as such): which
// way a path goes, that a NAR unlike what Nix recorded never leaves the
// worker, that a PUT the bucket does not take fails the add (retryably) and
// commits nothing, and that the farm's answer is asked again once stale.
// The whole way through a real bucket is e2e_farm_object_storage_test.
#include "worker/direct_upload_client.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/digest.h"
#include "common/nix_hash.h"
#include "tests/support/fake_clock.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

class FakeDirectFarm final : public FarmStoreClient {
 public:
  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& paths) override { return paths; }
  absl::Status AddPath(const kiln::v1::PathInfo&, absl::FunctionRef<absl::Status(NarSink)>) override {
    ++streamed;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> PublicKey() override { return "k:AAAA"; }
  absl::StatusOr<std::string> NarInfo(const std::string&) override { return absl::NotFoundError(""); }
  absl::Status FetchNar(const std::string&, NarSink) override { return absl::NotFoundError(""); }
  absl::StatusOr<bool> TakesDirectUploads() override {
    ++asked;
    return direct;
  }
  absl::StatusOr<kiln::v1::BeginUploadResponse> BeginUpload(const kiln::v1::DirectUpload& upload) override {
    begun.push_back(upload);
    kiln::v1::BeginUploadResponse r;
    r.set_already_held(held);
    r.set_put_url(put_url);
    return r;
  }
  absl::Status CommitUpload(const kiln::v1::DirectUpload&) override {
    ++committed;
    return absl::OkStatus();
  }

  bool direct = true, held = false;
  std::string put_url = "http://127.0.0.1:1/refused";  // Nothing listens on port 1.
  int asked = 0, streamed = 0, committed = 0;
  std::vector<kiln::v1::DirectUpload> begun;
};

kiln::v1::PathInfo InfoFor(const std::string& nar) {
  kiln::v1::PathInfo info;
  info.set_store_path("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a");
  NixHash h;
  h.algo = HashAlgo::kSha256;
  h.bytes = absl::HexStringToBytes(Sha256Hex(nar));
  info.set_nar_hash(absl::StrCat("sha256:", h.Base32()));
  info.set_nar_size(nar.size());
  return info;
}

class DirectUploadClientTest : public ::testing::Test {
 protected:
  absl::Status Add(const kiln::v1::PathInfo& info, const std::string& nar) {
    return client_.AddPath(info, [&](NarSink sink) { return sink(nar); });
  }
  testing::TempDir dir_;
  testing::FakeClock clock_;
  FakeDirectFarm farm_;
  DirectUploadClient client_{&farm_, dir_.Sub("staging"), &clock_};
};

TEST_F(DirectUploadClientTest, ANarUnlikeWhatNixRecordedNeverLeaves) {
  const std::string nar = "not really a NAR, but hashed";
  kiln::v1::PathInfo info = InfoFor(nar);
  const absl::Status damaged = Add(info, nar + "!");
  EXPECT_TRUE(absl::IsDataLoss(damaged)) << damaged;
  EXPECT_TRUE(farm_.begun.empty());
  EXPECT_EQ(farm_.committed, 0);
}

TEST_F(DirectUploadClientTest, AFailedPutCommitsNothingAndCanBeRetried) {
  const std::string nar = "some bytes";
  const absl::Status failed = Add(InfoFor(nar), nar);
  EXPECT_TRUE(absl::IsUnavailable(failed)) << failed;
  ASSERT_EQ(farm_.begun.size(), 1u);
  EXPECT_TRUE(absl::StartsWith(farm_.begun[0].file_hash(), "sha256:"));
  EXPECT_GT(farm_.begun[0].file_size(), 0u);
  EXPECT_EQ(farm_.committed, 0);
  EXPECT_EQ(client_.direct_uploads(), 0u);
  EXPECT_TRUE(std::filesystem::is_empty(dir_.Sub("staging"))) << "the staged body is removed";
}

TEST_F(DirectUploadClientTest, AHeldPathNeedsNoPut) {
  farm_.held = true;
  const std::string nar = "held";
  EXPECT_TRUE(Add(InfoFor(nar), nar).ok());
  EXPECT_EQ(farm_.committed, 0);
}

TEST_F(DirectUploadClientTest, WithoutDirectUploadsPathsStreamAndTheAnswerIsAskedAgainOnceStale) {
  farm_.direct = false;
  const std::string nar = "streamed";
  EXPECT_TRUE(Add(InfoFor(nar), nar).ok());
  EXPECT_TRUE(Add(InfoFor(nar), nar).ok());
  EXPECT_EQ(farm_.streamed, 2);
  EXPECT_EQ(farm_.asked, 1);
  clock_.Advance(DirectUploadClient::kModeLifetime + absl::Seconds(1));
  EXPECT_TRUE(Add(InfoFor(nar), nar).ok());
  EXPECT_EQ(farm_.asked, 2);
  EXPECT_TRUE(farm_.begun.empty());
}

}  // namespace
}  // namespace kiln
