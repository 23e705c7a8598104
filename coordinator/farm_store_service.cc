#include "coordinator/farm_store_service.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/nar_file.h"
#include "common/nix_hash.h"
#include "common/status_macros.h"

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
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kCacheRead);
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
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kCacheWrite);
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
  CountUpload(status, info.nar_size);
  return ToGrpcStatus(status);
}

grpc::Status FarmStoreServiceImpl::GetCacheInfo(grpc::ServerContext* context, const kiln::v1::GetCacheInfoRequest*,
                                                kiln::v1::CacheInfo* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kCacheRead);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  response->set_public_key(key_.PublicKeyText());
  response->set_direct_upload(store_->TakesDirectUploads());
  return grpc::Status::OK;
}

grpc::Status FarmStoreServiceImpl::GetNarInfo(grpc::ServerContext* context, const kiln::v1::GetNarInfoRequest* request,
                                              kiln::v1::GetNarInfoResponse* response) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kCacheRead);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  absl::StatusOr<NarInfo> info = store_->Get(request->hash_part());
  if (metrics_ != nullptr && (info.ok() || absl::IsNotFound(info.status()))) {
    metrics_->NarInfoRequests("worker", info.ok()).Increment();
  }
  if (info.ok()) info = SignNarInfo(*std::move(info), key_);
  if (!info.ok()) return ToGrpcStatus(info.status());
  response->set_narinfo(info->Render());
  return grpc::Status::OK;
}

grpc::Status FarmStoreServiceImpl::GetNar(grpc::ServerContext* context, const kiln::v1::GetNarRequest* request,
                                          grpc::ServerWriter<kiln::v1::NarChunk>* writer) {
  absl::StatusOr<Caller> caller = Authorize(auth_, *context, Scope::kCacheRead);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  absl::StatusOr<NarLocation> location = store_->LocateNar(request->name());
  if (!location.ok()) return ToGrpcStatus(location.status());
  kiln::v1::NarChunk chunk;
  if (!location->url.empty() && request->accept_redirect()) {
    chunk.set_redirect_url(location->url);
    if (metrics_ != nullptr) metrics_->NarRedirects("worker").Increment();
    writer->Write(chunk);
    return grpc::Status::OK;
  }
  absl::Status status = store_->ReadNar(request->name(), [&](absl::string_view piece) -> absl::Status {
    if (context->IsCancelled()) return absl::CancelledError("the reader went away");
    while (!piece.empty()) {
      const size_t n = std::min(piece.size(), kMaxChunkBytes);
      chunk.set_data(piece.data(), n);
      piece.remove_prefix(n);
      if (metrics_ != nullptr) metrics_->ServedBytes("worker").Increment(static_cast<double>(n));
      if (!writer->Write(chunk)) return absl::CancelledError("the reader went away");
    }
    return absl::OkStatus();
  });
  return ToGrpcStatus(status);
}

namespace {

absl::StatusOr<NarInfo> DirectUploadInfo(const kiln::v1::DirectUpload& upload) {
  const kiln::v1::PathInfo& announced = upload.info();
  NarInfo info;
  info.store_path = announced.store_path();
  info.nar_hash = announced.nar_hash();
  info.nar_size = announced.nar_size();
  info.references.assign(announced.references().begin(), announced.references().end());
  info.deriver = announced.deriver();
  info.ca = announced.ca();
  absl::StatusOr<NixHash> file_hash = ParseNixHash(upload.file_hash());
  if (!file_hash.ok() || file_hash->algo != HashAlgo::kSha256) {
    return absl::InvalidArgumentError("file_hash: a SHA-256 is needed");
  }
  info.file_hash = absl::StrCat("sha256:", file_hash->Base32());
  info.file_size = upload.file_size();
  info.url = absl::StrCat("nar/", file_hash->Base32(), kCompressedNarSuffix);
  info.compression = "zstd";
  return info;
}

}  // namespace

absl::StatusOr<std::optional<NarInfo>> FarmStoreServiceImpl::DirectUploadOf(grpc::ServerContext& context,
                                                                            const kiln::v1::DirectUpload& upload) {
  RETURN_IF_ERROR(Authorize(auth_, context, Scope::kWorker).status());
  ASSIGN_OR_RETURN(NarInfo info, DirectUploadInfo(upload));
  ASSIGN_OR_RETURN(std::vector<std::string> missing, store_->Missing({info.store_path}));
  if (missing.empty()) return std::nullopt;
  return info;
}

grpc::Status FarmStoreServiceImpl::BeginUpload(grpc::ServerContext* context, const kiln::v1::DirectUpload* request,
                                               kiln::v1::BeginUploadResponse* response) {
  absl::StatusOr<std::optional<NarInfo>> info = DirectUploadOf(*context, *request);
  if (!info.ok()) return ToGrpcStatus(info.status());
  if (!info->has_value()) {
    response->set_already_held(true);
    return grpc::Status::OK;
  }
  absl::StatusOr<std::string> url = store_->DirectUploadUrl(**info);
  if (!url.ok()) return ToGrpcStatus(url.status());
  response->set_put_url(*std::move(url));
  return grpc::Status::OK;
}

grpc::Status FarmStoreServiceImpl::CommitUpload(grpc::ServerContext* context, const kiln::v1::DirectUpload* request,
                                                kiln::v1::AddPathResponse* response) {
  absl::StatusOr<std::optional<NarInfo>> info = DirectUploadOf(*context, *request);
  if (!info.ok()) return ToGrpcStatus(info.status());
  if (!info->has_value()) {
    response->set_already_held(true);
    return grpc::Status::OK;
  }
  const absl::Status status = store_->CommitDirectUpload(**info);
  CountUpload(status, (*info)->nar_size);
  if (status.ok() && metrics_ != nullptr) metrics_->direct_uploads.Increment();
  return ToGrpcStatus(status);
}

void FarmStoreServiceImpl::CountUpload(const absl::Status& status, uint64_t nar_size) {
  if (metrics_ == nullptr) return;
  if (status.ok()) {
    metrics_->uploaded_paths.Increment();
    metrics_->uploaded_bytes.Increment(static_cast<double>(nar_size));
    metrics_->Update(store_->Stats());
    return;
  }
  const absl::StatusCode code = status.code();
  metrics_
      ->UploadsRefused(code == absl::StatusCode::kDataLoss || code == absl::StatusCode::kInvalidArgument ||
                               code == absl::StatusCode::kResourceExhausted
                           ? "bad_nar"
                       : code == absl::StatusCode::kFailedPrecondition ? "missing_reference"
                                                                       : "other")
      .Increment();
}

}  // namespace kiln
