// FarmStoreService: how workers fill the farm store (see proto store.proto),
// and how a worker's Nix reads it (through the worker's relay),
// on gRPC's synchronous API (a thread per upload; nothing touches the
// strand). AddPath needs `cache-write` (workers have it; a token only when
// given it); direct uploads `worker`; reads (QueryMissing and the Get*
// calls) `cache-read`, which every client scope includes.
#pragma once

#include <grpcpp/grpcpp.h>

#include <optional>

#include "coordinator/auth.h"
#include "common/narinfo.h"
#include "coordinator/farm_store.h"
#include "coordinator/farm_store_metrics.h"
#include "kiln/v1/store.grpc.pb.h"

namespace kiln {

class FarmStoreServiceImpl final : public kiln::v1::FarmStoreService::Service {
 public:
  static constexpr size_t kMaxPathsPerQuery = 100000;
  static constexpr size_t kMaxChunkBytes = size_t{1} << 20;

  // `key` signs the narinfos GetNarInfo returns. `metrics` may be null.
  FarmStoreServiceImpl(FarmStore* store, SigningKey key, const Authorizer* auth, FarmStoreMetrics* metrics = nullptr)
      : store_(store), key_(std::move(key)), auth_(auth), metrics_(metrics) {}

  grpc::Status QueryMissing(grpc::ServerContext* context, const kiln::v1::QueryMissingRequest* request,
                            kiln::v1::QueryMissingResponse* response) override;
  grpc::Status AddPath(grpc::ServerContext* context, grpc::ServerReader<kiln::v1::AddPathChunk>* reader,
                       kiln::v1::AddPathResponse* response) override;
  grpc::Status GetCacheInfo(grpc::ServerContext* context, const kiln::v1::GetCacheInfoRequest* request,
                            kiln::v1::CacheInfo* response) override;
  grpc::Status GetNarInfo(grpc::ServerContext* context, const kiln::v1::GetNarInfoRequest* request,
                          kiln::v1::GetNarInfoResponse* response) override;
  grpc::Status GetNar(grpc::ServerContext* context, const kiln::v1::GetNarRequest* request,
                      grpc::ServerWriter<kiln::v1::NarChunk>* writer) override;
  grpc::Status BeginUpload(grpc::ServerContext* context, const kiln::v1::DirectUpload* request,
                           kiln::v1::BeginUploadResponse* response) override;
  grpc::Status CommitUpload(grpc::ServerContext* context, const kiln::v1::DirectUpload* request,
                            kiln::v1::AddPathResponse* response) override;

 private:
  // A direct upload's caller checked and its narinfo made; nullopt when the
  // store holds the path already.
  absl::StatusOr<std::optional<NarInfo>> DirectUploadOf(grpc::ServerContext& context,
                                                        const kiln::v1::DirectUpload& upload);
  // The uploads counted, and refusals by reason.
  void CountUpload(const absl::Status& status, uint64_t nar_size);

  FarmStore* const store_;
  const SigningKey key_;
  const Authorizer* const auth_;
  FarmStoreMetrics* const metrics_;
};

}  // namespace kiln
