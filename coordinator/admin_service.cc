#include "coordinator/admin_service.h"

#include "common/grpc_util.h"
#include "common/log.h"

namespace kiln {

grpc::Status AdminServiceImpl::CreateToken(grpc::ServerContext* context, const kiln::v1::CreateTokenRequest* request,
                                           kiln::v1::CreateTokenResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  absl::StatusOr<kiln::v1::CreateTokenResponse> created =
      tokens_->Create(request->name(), {request->scopes().begin(), request->scopes().end()});
  if (!created.ok()) return ToGrpcStatus(created.status());
  LogInfo("coordinator", caller->who, " created token '", created->token().name(), "' (id ", created->token().id(),
          ")");
  *response = *std::move(created);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::ListTokens(grpc::ServerContext* context, const kiln::v1::ListTokensRequest*,
                                          kiln::v1::ListTokensResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  for (kiln::v1::TokenInfo& info : tokens_->List()) *response->add_tokens() = std::move(info);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::RevokeToken(grpc::ServerContext* context, const kiln::v1::RevokeTokenRequest* request,
                                           kiln::v1::RevokeTokenResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  absl::StatusOr<kiln::v1::TokenInfo> revoked = tokens_->Revoke(request->name());
  if (!revoked.ok()) return ToGrpcStatus(revoked.status());
  LogInfo("coordinator", caller->who, " revoked token '", revoked->name(), "' (id ", revoked->id(), ")");
  *response->mutable_token() = *std::move(revoked);
  return grpc::Status::OK;
}

grpc::Status AdminServiceImpl::Backup(grpc::ServerContext* context, const kiln::v1::BackupRequest* request,
                                      kiln::v1::BackupResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (state_ == nullptr) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no state to back up here");
  absl::StatusOr<RocksDbStateStore::BackupStats> stats = state_->Backup(request->destination());
  if (!stats.ok()) return ToGrpcStatus(stats.status());
  LogInfo("coordinator", caller->who, " backed the state up to ", request->destination(), " (", stats->cas_files,
          " CAS file(s))");
  response->set_destination(request->destination());
  response->set_cas_files(stats->cas_files);
  response->set_sst_bytes(stats->sst_bytes);
  response->set_hard_linked(stats->hard_linked);
  return grpc::Status::OK;
}

}  // namespace kiln
