// The CasService over a CasStore. Bulk transfers block on RocksDB and on the
// peer, so this service uses gRPC's synchronous API (its own thread pool)
// rather than the callback reactors the long-lived streams use; nothing here
// touches the coordinator's strand.
#pragma once

#include <cstdint>

#include "coordinator/auth.h"
#include "coordinator/cas_store.h"
#include "coordinator/coordinator_metrics.h"
#include "kiln/v1/cas.grpc.pb.h"

namespace kiln {

struct CasServiceLimits {
  size_t max_digests_per_request = 200000;
  uint64_t max_upload_bytes = uint64_t{8} << 30;  // Per WriteBlobs call.
};

class CasServiceImpl final : public kiln::v1::CasService::Service {
 public:
  CasServiceImpl(CasStore* cas, CoordinatorMetrics* metrics, CasServiceLimits limits = {},
                 const Authorizer* auth = nullptr)
      : cas_(cas), metrics_(metrics), limits_(limits), auth_(auth) {}

  grpc::Status FindMissingBlobs(grpc::ServerContext* context, const kiln::v1::FindMissingBlobsRequest* request,
                                kiln::v1::FindMissingBlobsResponse* response) override;
  grpc::Status WriteBlobs(grpc::ServerContext* context, grpc::ServerReader<kiln::v1::WriteBlobsChunk>* reader,
                          kiln::v1::WriteBlobsResponse* response) override;
  grpc::Status ReadBlobs(grpc::ServerContext* context, const kiln::v1::ReadBlobsRequest* request,
                         grpc::ServerWriter<kiln::v1::ReadBlobsChunk>* writer) override;
  grpc::Status GetTree(grpc::ServerContext* context, const kiln::v1::GetTreeRequest* request,
                       kiln::v1::GetTreeResponse* response) override;

 private:
  CasStore* const cas_;
  CoordinatorMetrics* const metrics_;
  const CasServiceLimits limits_;
  const Authorizer* const auth_;
};

}  // namespace kiln
