// LocalS3: an S3-compatible server on 127.0.0.1 for the object-storage farm
// store's tests — the standalone server of moto (Python; `moto_server`),
// which keeps buckets in memory and starts in a second or two. With
// `verify_signatures`, moto checks every request's SigV4 signature against
// an IAM user made here (its query-signed, presigned URLs it cannot check:
// those are proved against AWS's published example instead). Stopped on
// destruction.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln::testing {

class LocalS3 {
 public:
  struct Options {
    std::string bucket = "kiln-farm";
    bool verify_signatures = false;
    // Anyone may GET objects (a bucket policy, as an operator sets one on
    // a bucket that Nix clients read directly). Not with verify_signatures.
    bool public_read = true;
  };
  static absl::StatusOr<std::unique_ptr<LocalS3>> Start(const Options& options);
  ~LocalS3();

  const std::string& endpoint() const { return endpoint_; }  // 127.0.0.1:PORT
  const std::string& bucket() const { return bucket_; }
  // The farm's --cache-store for this bucket.
  std::string StoreUri() const;
  // http://127.0.0.1:PORT/BUCKET: the bucket as a binary cache.
  std::string BucketUrl() const;
  // An AWS-style credentials file with a key the server accepts.
  std::string CredentialsFile() const { return dir_.Sub("credentials"); }
  const std::string& access_key_id() const { return access_key_id_; }
  const std::string& secret_access_key() const { return secret_access_key_; }
  std::string LogText() const;

 private:
  LocalS3() = default;
  TempDir dir_;
  std::unique_ptr<Daemon> daemon_;
  std::string endpoint_, bucket_, access_key_id_, secret_access_key_;
};

}  // namespace kiln::testing
