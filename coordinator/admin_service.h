// AdminService: client tokens and backups, for the local administrator
// (the admin socket) and tokens with the admin scope.
#pragma once

#include "coordinator/auth.h"
#include "coordinator/rocksdb_state_store.h"
#include "coordinator/token_store.h"
#include "kiln/v1/admin.grpc.pb.h"

namespace kiln {

class AdminServiceImpl final : public kiln::v1::AdminService::Service {
 public:
  // All must outlive the server; `auth` null: no checks (tests); `state`
  // null: no backups.
  AdminServiceImpl(TokenStore* tokens, const Authorizer* auth, RocksDbStateStore* state = nullptr)
      : tokens_(tokens), auth_(auth), state_(state) {}

  grpc::Status CreateToken(grpc::ServerContext* context, const kiln::v1::CreateTokenRequest* request,
                           kiln::v1::CreateTokenResponse* response) override;
  grpc::Status ListTokens(grpc::ServerContext* context, const kiln::v1::ListTokensRequest* request,
                          kiln::v1::ListTokensResponse* response) override;
  grpc::Status RevokeToken(grpc::ServerContext* context, const kiln::v1::RevokeTokenRequest* request,
                           kiln::v1::RevokeTokenResponse* response) override;
  grpc::Status Backup(grpc::ServerContext* context, const kiln::v1::BackupRequest* request,
                      kiln::v1::BackupResponse* response) override;

 private:
  TokenStore* const tokens_;
  const Authorizer* const auth_;
  RocksDbStateStore* const state_;
};

}  // namespace kiln
