// RegistryClient: the parts of the OCI distribution protocol a push needs.
// HttpRegistryClient speaks it over libcurl (HTTPS, or plain HTTP for
// registries named insecure), with Basic credentials or the Bearer token
// flow they unlock, and retries on connection errors, 5xx and 429.
//
// Credentials never appear in an error, a log line or anything returned.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/image_ref.h"

namespace kiln {

struct RegistryCredentials {
  std::string username;
  std::string password;
};

struct RegistryOptions {
  bool plain_http = false;  // Only for registries named insecure.
  std::string ca_file;      // Empty: the system's CA bundle.
  RegistryCredentials credentials;
  int max_attempts = 6;
  absl::Duration max_backoff = absl::Seconds(10);
  size_t monolithic_max_bytes = 8 << 20;  // Larger blobs go in PATCH chunks.
  size_t chunk_bytes = 32 << 20;
  // Called, from whichever thread sends, as request bodies go out (bytes
  // sent again after a retry count again): for progress displays.
  std::function<void(uint64_t bytes)> on_sent;
  // Called before each retry with a line for the job's log (what failed,
  // when the next attempt is), so a push against a dead registry is not
  // silent. May be called from several threads at once.
  std::function<void(absl::string_view line)> on_retry;
};

// Where a blob's bytes come from: a file or memory.
struct BlobSource {
  std::string file;  // When set, the bytes are this file's.
  std::string data;
  uint64_t size = 0;
};

// A blob sent as it is produced: its digest is known only at the end.
class BlobStream {
 public:
  virtual ~BlobStream() = default;
  virtual absl::Status Append(absl::string_view data) = 0;
  virtual absl::Status Finish(const std::string& digest) = 0;
};

class RegistryClient {
 public:
  virtual ~RegistryClient() = default;
  // Starts an upload to `repository` fed piece by piece (PATCH chunks).
  virtual absl::StatusOr<std::unique_ptr<BlobStream>> StartStream(const std::string& repository) = 0;
  virtual absl::StatusOr<bool> HasBlob(const std::string& repository, const std::string& digest) = 0;
  virtual absl::Status UploadBlob(const std::string& repository, const std::string& digest, const BlobSource& blob) = 0;
  // Links a blob the registry holds for `from` into `repository` without
  // sending it; false when the registry would not (the blob must be sent).
  virtual absl::StatusOr<bool> MountBlob(const std::string& repository, const std::string& digest,
                                         const std::string& from) = 0;
  // The digest of the manifest `reference` (a tag or a digest) names in
  // `repository`, "" when there is none. A registry takes a manifest only
  // once it holds every blob the manifest names, so a manifest found stands
  // for its whole image. A client that cannot tell says "".
  virtual absl::StatusOr<std::string> ManifestDigest(const std::string& repository, const std::string& reference,
                                                     const std::string& media_type) {
    (void)repository, (void)reference, (void)media_type;
    return std::string();
  }
  // Returns the digest the registry gives the manifest.
  virtual absl::StatusOr<std::string> PutManifest(const std::string& repository, const std::string& reference,
                                                  const std::string& media_type, const std::string& body) = 0;
};

// One per thread: it keeps one connection (libcurl easy handle) open.
class HttpRegistryClient final : public RegistryClient {
 public:
  HttpRegistryClient(std::string registry, RegistryOptions options);
  ~HttpRegistryClient() override;

  absl::StatusOr<bool> HasBlob(const std::string& repository, const std::string& digest) override;
  absl::Status UploadBlob(const std::string& repository, const std::string& digest, const BlobSource& blob) override;
  absl::StatusOr<bool> MountBlob(const std::string& repository, const std::string& digest,
                                 const std::string& from) override;
  absl::StatusOr<std::unique_ptr<BlobStream>> StartStream(const std::string& repository) override;
  absl::StatusOr<std::string> ManifestDigest(const std::string& repository, const std::string& reference,
                                             const std::string& media_type) override;
  absl::StatusOr<std::string> PutManifest(const std::string& repository, const std::string& reference,
                                          const std::string& media_type, const std::string& body) override;

  // Requests made so far, by method (for tests and the push report).
  int requests(const std::string& method) const;

  struct Impl;  // Opaque; named here for the upload streams it hands out.

 private:
  std::unique_ptr<Impl> impl_;
};

// The parameters of a WWW-Authenticate challenge after its scheme
// (`realm="…",service="…",scope="…"`), keys in lower case.
std::map<std::string, std::string> ParseAuthParams(absl::string_view challenge);

// "CODE: message; …" from a registry's JSON error body ("" when it has none).
std::string RegistryErrorSummary(const std::string& body);

}  // namespace kiln
