#include "coordinator/farm_store_service.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/nix_hash.h"

namespace kiln {
namespace {

// A reference as the store keeps it: the base name.
std::string BaseName(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

grpc::Status FarmStoreServiceImpl::QueryMissing(grpc::ServerContext* context,
                                                const kiln::v1::QueryMissingRequest* request,
                                                kiln::v1::QueryMissingResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kWorker);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  if (static_cast<size_t>(request->store_paths_size()) > kMaxPathsPerQuery) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("at most ", kMaxPathsPerQuery, " paths per query"));
  }
  absl::StatusOr<std::vector<std::string>> missing =
      store_->Missing(std::vector<std::string>(request->store_paths().begin(), request->store_paths().end()));
  if (!missing.ok()) return ToGrpcStatus(missing.status());
  for (std::string& p : *missing) response->add_missing(std::move(p));
  return grpc::Status::OK;
}

grpc::Status FarmStoreServiceImpl::AddPath(grpc::ServerContext* context,
                                           grpc::ServerReader<kiln::v1::AddPathChunk>* reader,
                                           kiln::v1::AddPathResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kWorker);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  kiln::v1::AddPathChunk chunk;
  if (!reader->Read(&chunk) || !chunk.has_info()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the first message announces the path");
  }
  const kiln::v1::PathInfo& announced = chunk.info();
  NarInfo info;
  info.store_path = announced.store_path();
  absl::StatusOr<NixHash> nar_hash = ParseNixHash(announced.nar_hash());
  if (!nar_hash.ok() || nar_hash->algo != HashAlgo::kSha256) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "nar_hash: a SHA-256 is needed");
  }
  info.nar_hash = absl::StrCat("sha256:", nar_hash->Base32());
  info.nar_size = announced.nar_size();
  for (const std::string& r : announced.references()) info.references.push_back(BaseName(r));
  info.deriver = BaseName(announced.deriver());
  info.ca = announced.ca();
  absl::StatusOr<std::vector<std::string>> missing = store_->Missing({info.store_path});
  if (!missing.ok()) return ToGrpcStatus(missing.status());
  if (missing->empty()) {
    response->set_already_held(true);
    return grpc::Status::OK;
  }
  // The NAR, pulled from the stream as the store reads it: the first
  // message's bytes, then each next message's.
  std::string pending = std::move(*chunk.mutable_nar());
  size_t at = 0;
  bool ended = false;
  absl::Status status = store_->Add(info, [&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    while (at == pending.size() && !ended) {
      chunk.Clear();
      if (!reader->Read(&chunk)) {
        ended = true;
        break;
      }
      if (chunk.nar().size() > kMaxChunkBytes) {
        return absl::InvalidArgumentError(absl::StrCat("NAR chunks are at most ", kMaxChunkBytes, " bytes"));
      }
      pending = std::move(*chunk.mutable_nar());
      at = 0;
    }
    const size_t n = std::min(size, pending.size() - at);
    std::memcpy(buf, pending.data() + at, n);
    at += n;
    return n;
  });
  return ToGrpcStatus(status);
}

}  // namespace kiln
