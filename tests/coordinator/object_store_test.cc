// The S3 client: SigV4 presigning against AWS's published example, the
// parsing of store URIs and credentials files, and every request against a
// real S3-compatible server (moto) that checks signatures.
#include "coordinator/object_store.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/civil_time.h"
#include "tests/support/local_s3.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

// The example of a presigned URL in Amazon S3's documentation
// ("Authenticating Requests: Using Query Parameters").
TEST(S3PresignTest, MatchesAwsPublishedExample) {
  const S3Credentials credentials{"AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"};
  const absl::Time when = absl::FromCivil(absl::CivilSecond(2013, 5, 24, 0, 0, 0), absl::UTCTimeZone());
  const std::string url = PresignSigV4("GET", "https", "examplebucket.s3.amazonaws.com", "/test.txt", "us-east-1",
                                       credentials, when, absl::Hours(24));
  EXPECT_EQ(url,
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
            "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
            "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404");
}

TEST(S3PresignTest, KeysAreEncodedAsS3Wants) {
  EXPECT_EQ(S3EncodePath("nar/abc.nar.zst"), "nar/abc.nar.zst");
  EXPECT_EQ(S3EncodePath("a b+c"), "a%20b%2Bc");
}

TEST(S3ConfigTest, StoreUrisAndCredentialsFiles) {
  absl::StatusOr<S3Location> scw = ParseS3Uri("s3://farm?endpoint=s3.fr-par.scw.cloud&region=fr-par");
  ASSERT_TRUE(scw.ok()) << scw.status();
  EXPECT_EQ(scw->bucket, "farm");
  EXPECT_EQ(scw->endpoint, "s3.fr-par.scw.cloud");
  EXPECT_EQ(scw->region, "fr-par");
  EXPECT_EQ(scw->scheme, "https");
  EXPECT_EQ(ParseS3Uri("s3://b?region=eu-west-1")->endpoint, "s3.eu-west-1.amazonaws.com");
  EXPECT_FALSE(ParseS3Uri("https://b").ok());
  EXPECT_FALSE(ParseS3Uri("s3://b?scheme=ftp").ok());
  EXPECT_FALSE(ParseS3Uri("s3://b?bucket=x").ok());
  EXPECT_FALSE(ParseS3Uri("s3://?endpoint=x").ok());

  testing::TempDir dir;
  testing::WriteFileOrDie(dir.Sub("creds"),
                          "[default]\n# a comment\naws_access_key_id = AKIAX\naws_secret_access_key=s3cr3t\n");
  absl::StatusOr<S3Credentials> c = LoadS3Credentials(dir.Sub("creds"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->access_key_id, "AKIAX");
  EXPECT_EQ(c->secret_access_key, "s3cr3t");
  testing::WriteFileOrDie(dir.Sub("half"), "aws_access_key_id = AKIAX\nsecret = s3cr3t\n");
  absl::Status half = LoadS3Credentials(dir.Sub("half")).status();
  EXPECT_FALSE(half.ok());
  EXPECT_FALSE(absl::StrContains(half.message(), "s3cr3t")) << "errors never quote the file";
  EXPECT_TRUE(absl::IsNotFound(LoadS3Credentials(dir.Sub("absent")).status()));
}

TEST(S3ObjectStoreTest, EveryRequestIsSignedAsTheServerChecks) {
  testing::LocalS3::Options options;
  options.verify_signatures = true;
  absl::StatusOr<std::unique_ptr<testing::LocalS3>> s3 = testing::LocalS3::Start(options);
  ASSERT_TRUE(s3.ok()) << s3.status();
  absl::StatusOr<S3Location> location = ParseS3Uri((*s3)->StoreUri());
  ASSERT_TRUE(location.ok());
  S3ObjectStore store(*location, {(*s3)->access_key_id(), (*s3)->secret_access_key()});
  const absl::Status put = store.Put("nar/x y.nar.zst", "body bytes", "application/x-nix-nar");
  ASSERT_TRUE(put.ok()) << put;
  testing::TempDir dir;
  testing::WriteFileOrDie(dir.Sub("file"), std::string(100000, 'f'));
  ASSERT_TRUE(store.PutFile("nar/big.nar.zst", dir.Sub("file"), "application/x-nix-nar").ok());
  EXPECT_EQ(*store.Size("nar/x y.nar.zst"), 10u);
  EXPECT_EQ(*store.Size("nar/big.nar.zst"), 100000u);
  EXPECT_TRUE(absl::IsNotFound(store.Size("absent").status()));
  std::string read;
  ASSERT_TRUE(store
                  .Get("nar/big.nar.zst",
                       [&](absl::string_view p) {
                         read.append(p.data(), p.size());
                         return absl::OkStatus();
                       })
                  .ok());
  EXPECT_EQ(read, std::string(100000, 'f'));
  EXPECT_TRUE(absl::IsNotFound(store.Get("absent", [](absl::string_view) { return absl::OkStatus(); })));
  ASSERT_TRUE(store.Delete("nar/big.nar.zst").ok());
  EXPECT_TRUE(absl::IsNotFound(store.Size("nar/big.nar.zst").status()));
  EXPECT_TRUE(store.Delete("nar/big.nar.zst").ok()) << "deleting what is gone is fine";

  // A wrong secret: refused by the server, and the error does not quote it.
  S3ObjectStore wrong(*location, {(*s3)->access_key_id(), "not-the-secret"});
  absl::Status refused = wrong.Put("k", "v", "text/plain");
  EXPECT_TRUE(absl::IsPermissionDenied(refused)) << refused;
  EXPECT_TRUE(absl::StrContains(refused.message(), "SignatureDoesNotMatch")) << refused;
  EXPECT_FALSE(absl::StrContains(refused.message(), "not-the-secret"));
}

}  // namespace
}  // namespace kiln
