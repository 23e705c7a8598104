#include "coordinator/fod_service.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/log.h"

namespace kiln {

using kiln::v1::FodVerdict;

namespace {

grpc::Status TooMany(size_t n) {
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                      absl::StrCat(n, " FODs in one request; the limit is ", FodServiceImpl::kMaxFodsPerRequest));
}

}  // namespace

grpc::Status FodServiceImpl::CheckFods(grpc::ServerContext* context, const kiln::v1::CheckFodsRequest* request,
                                       kiln::v1::CheckFodsResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (static_cast<size_t>(request->fods_size()) > kMaxFodsPerRequest) return TooMany(request->fods_size());
  absl::StatusOr<std::vector<FodVerdict>> verdicts =
      cache_->Check(std::vector<kiln::v1::FodRef>(request->fods().begin(), request->fods().end()));
  if (!verdicts.ok()) return ToGrpcStatus(verdicts.status());
  for (FodVerdict& v : *verdicts) {
    switch (v.kind()) {
      case FodVerdict::KIND_RIGHT: metrics_->FodLookups("hit").Increment(); break;
      case FodVerdict::KIND_WRONG:
        metrics_->FodLookups("stale_caught").Increment();
        metrics_->fod_builds_avoided.Increment();
        metrics_->fod_build_seconds_saved.Increment(v.entry().build_seconds());
        break;
      case FodVerdict::KIND_SUSPECT_STALE: metrics_->FodLookups("suspect").Increment(); break;
      case FodVerdict::KIND_NONDETERMINISTIC: metrics_->FodLookups("nondeterministic").Increment(); break;
      default: metrics_->FodLookups("miss").Increment(); break;
    }
    *response->add_verdicts() = std::move(v);
  }
  return grpc::Status::OK;
}

grpc::Status FodServiceImpl::RecordFods(grpc::ServerContext* context, const kiln::v1::RecordFodsRequest* request,
                                        kiln::v1::RecordFodsResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kWorker);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (static_cast<size_t>(request->outcomes_size()) > kMaxFodsPerRequest) return TooMany(request->outcomes_size());
  absl::StatusOr<std::vector<std::string>> odd = cache_->Record(
      std::vector<kiln::v1::FodOutcome>(request->outcomes().begin(), request->outcomes().end()), request->job_id(),
      caller->worker.empty() ? request->worker() : caller->worker);  // A certificate's name beats a claim.
  if (!odd.ok()) return ToGrpcStatus(odd.status());
  metrics_->fod_recorded.Increment(request->outcomes_size());
  metrics_->fod_entries.Set(static_cast<double>(cache_->size()));
  for (std::string& key : *odd) {
    LogWarning("fod", "FOD key ", key.substr(0, 12), " is nondeterministic: job ", request->job_id(),
               " produced a different hash");
    response->add_nondeterministic_keys(std::move(key));
  }
  return grpc::Status::OK;
}

grpc::Status FodServiceImpl::ListFods(grpc::ServerContext* context, const kiln::v1::ListFodsRequest* request,
                                      kiln::v1::ListFodsResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kRead);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  absl::StatusOr<std::vector<kiln::v1::FodEntry>> entries =
      cache_->List(request->name(), request->key_prefix(), request->limit());
  if (!entries.ok()) return ToGrpcStatus(entries.status());
  for (auto& e : *entries) *response->add_entries() = std::move(e);
  return grpc::Status::OK;
}

grpc::Status FodServiceImpl::ForgetFods(grpc::ServerContext* context, const kiln::v1::ForgetFodsRequest* request,
                                        kiln::v1::ForgetFodsResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (request->key_prefixes().empty() && request->name().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "name a key prefix or a derivation name to forget");
  }
  absl::StatusOr<uint32_t> n = cache_->Forget(
      std::vector<std::string>(request->key_prefixes().begin(), request->key_prefixes().end()), request->name());
  if (!n.ok()) return ToGrpcStatus(n.status());
  response->set_forgotten(*n);
  metrics_->fod_entries.Set(static_cast<double>(cache_->size()));
  return grpc::Status::OK;
}

grpc::Status FodServiceImpl::ImportFods(grpc::ServerContext* context, const kiln::v1::ImportFodsRequest* request,
                                        kiln::v1::ImportFodsResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kAdmin);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (static_cast<size_t>(request->entries_size()) > kMaxFodsPerRequest) return TooMany(request->entries_size());
  absl::StatusOr<kiln::v1::ImportFodsResponse> r =
      cache_->Import(std::vector<kiln::v1::FodEntry>(request->entries().begin(), request->entries().end()));
  if (!r.ok()) return ToGrpcStatus(r.status());
  *response = *std::move(r);
  metrics_->fod_entries.Set(static_cast<double>(cache_->size()));
  return grpc::Status::OK;
}

}  // namespace kiln
