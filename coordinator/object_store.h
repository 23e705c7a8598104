// ObjectStore: the bucket behind the object-storage farm store (see
// coordinator/object_farm_store.h). S3ObjectStore speaks S3 (Scaleway Object
// Storage, AWS, any compatible server); tests of the farm store's own rules
// use an in-memory fake (tests/support/fake_object_store.h).
//
// Addressing is path-style (SCHEME://ENDPOINT/BUCKET/KEY), which every
// S3-compatible service accepts. Requests are signed with SigV4 by libcurl;
// presigned URLs (for workers, who hold no bucket credentials) are signed
// here, as query strings.
#pragma once

#include <cstdint>
#include <string>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/clock.h"

namespace kiln {

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;
  virtual absl::Status Put(const std::string& key, absl::string_view body, absl::string_view content_type) = 0;
  virtual absl::Status PutFile(const std::string& key, const std::string& file, absl::string_view content_type) = 0;
  // The object's size; NOT_FOUND when there is none.
  virtual absl::StatusOr<uint64_t> Size(const std::string& key) = 0;
  // The object's bytes, piece by piece; NOT_FOUND when there is none.
  virtual absl::Status Get(const std::string& key, absl::FunctionRef<absl::Status(absl::string_view)> sink) = 0;
  // Absent already: OK.
  virtual absl::Status Delete(const std::string& key) = 0;
  // A URL whose holder may `method` (GET or PUT) the object, for `valid_for`.
  virtual absl::StatusOr<std::string> PresignedUrl(absl::string_view method, const std::string& key,
                                                   absl::Duration valid_for) = 0;
  // Where clients read the bucket as a binary cache (no trailing slash).
  virtual std::string PublicUrl() const = 0;
};

struct S3Credentials {
  std::string access_key_id;
  std::string secret_access_key;
};

struct S3Location {
  std::string bucket;
  std::string endpoint;  // HOST[:PORT]
  std::string region = "us-east-1";
  std::string scheme = "https";
};

// Nix's spelling of an S3 store: s3://BUCKET?endpoint=HOST[:PORT]&region=R&scheme=https|http.
absl::StatusOr<S3Location> ParseS3Uri(absl::string_view uri);

// An AWS-style credentials file: `aws_access_key_id = …` and
// `aws_secret_access_key = …` lines (sections and comments ignored). The
// error names the file, never its content.
absl::StatusOr<S3Credentials> LoadS3Credentials(const std::string& path);

// A SigV4 query-string signature (UNSIGNED-PAYLOAD, only `host` signed):
// the URL SCHEME://HOST CANONICAL_URI?X-Amz-…&X-Amz-Signature=….
// `canonical_uri` is already percent-encoded.
std::string PresignSigV4(absl::string_view method, absl::string_view scheme, absl::string_view host,
                         absl::string_view canonical_uri, absl::string_view region, const S3Credentials& credentials,
                         absl::Time now, absl::Duration valid_for);

// S3's encoding of a key in a path: every byte but A-Z a-z 0-9 - _ . ~ and /
// as %XX.
std::string S3EncodePath(absl::string_view path);

class S3ObjectStore final : public ObjectStore {
 public:
  S3ObjectStore(S3Location location, S3Credentials credentials, const Clock* clock = RealClock::Get())
      : location_(std::move(location)), credentials_(std::move(credentials)), clock_(clock) {}

  absl::Status Put(const std::string& key, absl::string_view body, absl::string_view content_type) override;
  absl::Status PutFile(const std::string& key, const std::string& file, absl::string_view content_type) override;
  absl::StatusOr<uint64_t> Size(const std::string& key) override;
  absl::Status Get(const std::string& key, absl::FunctionRef<absl::Status(absl::string_view)> sink) override;
  absl::Status Delete(const std::string& key) override;
  absl::StatusOr<std::string> PresignedUrl(absl::string_view method, const std::string& key,
                                           absl::Duration valid_for) override;
  std::string PublicUrl() const override;

 private:
  std::string ObjectUrl(const std::string& key) const;

  const S3Location location_;
  const S3Credentials credentials_;
  const Clock* const clock_;
};

}  // namespace kiln
