// The FodService over a FodCache. Calls are short RocksDB reads and writes
// made from gRPC's synchronous thread pool; nothing here touches the
// coordinator's strand.
#pragma once

#include <cstddef>

#include "coordinator/auth.h"
#include "coordinator/coordinator_metrics.h"
#include "coordinator/fod_hash_store.h"
#include "kiln/v1/fod.grpc.pb.h"

namespace kiln {

class FodServiceImpl final : public kiln::v1::FodService::Service {
 public:
  // Bounds what one request may carry.
  static constexpr size_t kMaxFodsPerRequest = 100000;

  FodServiceImpl(FodHashStore* cache, CoordinatorMetrics* metrics, const Authorizer* auth = nullptr)
      : cache_(cache), metrics_(metrics), auth_(auth) {}

  grpc::Status CheckFods(grpc::ServerContext* context, const kiln::v1::CheckFodsRequest* request,
                         kiln::v1::CheckFodsResponse* response) override;
  grpc::Status RecordFods(grpc::ServerContext* context, const kiln::v1::RecordFodsRequest* request,
                          kiln::v1::RecordFodsResponse* response) override;
  grpc::Status ListFods(grpc::ServerContext* context, const kiln::v1::ListFodsRequest* request,
                        kiln::v1::ListFodsResponse* response) override;
  grpc::Status ForgetFods(grpc::ServerContext* context, const kiln::v1::ForgetFodsRequest* request,
                          kiln::v1::ForgetFodsResponse* response) override;
  grpc::Status ImportFods(grpc::ServerContext* context, const kiln::v1::ImportFodsRequest* request,
                          kiln::v1::ImportFodsResponse* response) override;

 private:
  FodHashStore* const cache_;
  CoordinatorMetrics* const metrics_;
  const Authorizer* const auth_;
};

}  // namespace kiln
