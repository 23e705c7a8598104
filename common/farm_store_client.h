// FarmStoreClient: the worker's side of the farm store (proto store.proto):
// what it asks before an upload, the upload itself (its own streaming call,
// apart from the control stream), and the reads its Nix makes through the
// relay (worker/farm_cache_relay.h) and `kiln copy`. GrpcFarmStoreClient is the real one;
// tests use a fake over an in-memory store.
//
// Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "common/nar_dump.h"
#include "kiln/v1/store.grpc.pb.h"

namespace grpc {
class Channel;
}  // namespace grpc

namespace kiln {

class FarmStoreClient {
 public:
  virtual ~FarmStoreClient() = default;
  // The paths among `store_paths` the farm store lacks.
  virtual absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& store_paths) = 0;
  // Adds one path; `write_nar` writes its NAR into the sink it is given.
  // FAILED_PRECONDITION while a path it references is missing.
  virtual absl::Status AddPath(const kiln::v1::PathInfo& info,
                               absl::FunctionRef<absl::Status(NarSink sink)> write_nar) = 0;
  // The trusted-public-keys entry of the key the farm signs with.
  virtual absl::StatusOr<std::string> PublicKey() = 0;
  // The signed narinfo of the path with this hash part; NOT_FOUND if absent.
  virtual absl::StatusOr<std::string> NarInfo(const std::string& hash_part) = 0;
  // The NAR file a narinfo's URL names (after "nar/"), into `sink`.
  virtual absl::Status FetchNar(const std::string& name, NarSink sink) = 0;
  // The same, but where the farm keeps the NAR in object storage: a URL to
  // fetch it from (presigned, short-lived), and nothing into `sink`. ""
  // when the NAR went into `sink`.
  virtual absl::StatusOr<std::string> FetchNarOrUrl(const std::string& name, NarSink sink);

  // Uploads straight to object storage (see store.proto's BeginUpload):
  // whether the farm store takes them, the URL to PUT a body to, and the
  // path made valid once it is there. UNIMPLEMENTED unless the farm does.
  virtual absl::StatusOr<bool> TakesDirectUploads();
  virtual absl::StatusOr<kiln::v1::BeginUploadResponse> BeginUpload(const kiln::v1::DirectUpload& upload);
  virtual absl::Status CommitUpload(const kiln::v1::DirectUpload& upload);
};

class GrpcFarmStoreClient final : public FarmStoreClient {
 public:
  explicit GrpcFarmStoreClient(std::shared_ptr<grpc::Channel> channel);

  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& store_paths) override;
  absl::Status AddPath(const kiln::v1::PathInfo& info,
                       absl::FunctionRef<absl::Status(NarSink sink)> write_nar) override;
  absl::StatusOr<std::string> PublicKey() override;
  absl::StatusOr<std::string> NarInfo(const std::string& hash_part) override;
  absl::Status FetchNar(const std::string& name, NarSink sink) override;
  absl::StatusOr<std::string> FetchNarOrUrl(const std::string& name, NarSink sink) override;
  absl::StatusOr<bool> TakesDirectUploads() override;
  absl::StatusOr<kiln::v1::BeginUploadResponse> BeginUpload(const kiln::v1::DirectUpload& upload) override;
  absl::Status CommitUpload(const kiln::v1::DirectUpload& upload) override;

 private:
  absl::StatusOr<std::string> Fetch(const std::string& name, NarSink sink, bool accept_redirect);

  std::unique_ptr<kiln::v1::FarmStoreService::Stub> stub_;
};

}  // namespace kiln
