#include "common/farm_store_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr size_t kChunkBytes = size_t{1} << 20;  // The service's limit per message.

std::chrono::system_clock::time_point DeadlineIn(absl::Duration d) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(d);
}

}  // namespace

GrpcFarmStoreClient::GrpcFarmStoreClient(std::shared_ptr<grpc::Channel> channel)
    : stub_(kiln::v1::FarmStoreService::NewStub(std::move(channel))) {}

absl::StatusOr<std::vector<std::string>> GrpcFarmStoreClient::Missing(const std::vector<std::string>& store_paths) {
  kiln::v1::QueryMissingRequest request;
  for (const std::string& p : store_paths) request.add_store_paths(p);
  kiln::v1::QueryMissingResponse response;
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(absl::Seconds(30)));
  if (grpc::Status s = stub_->QueryMissing(&context, request, &response); !s.ok()) return FromGrpcStatus(s);
  return std::vector<std::string>(response.missing().begin(), response.missing().end());
}

absl::Status GrpcFarmStoreClient::AddPath(const kiln::v1::PathInfo& info,
                                          absl::FunctionRef<absl::Status(NarSink sink)> write_nar) {
  grpc::ClientContext context;
  // A minute, and as long again as the NAR takes at 4 MiB/s: a stalled
  // upload ends, a large one is not cut short.
  context.set_deadline(DeadlineIn(absl::Minutes(1) + absl::Seconds(static_cast<double>(info.nar_size() >> 22))));
  kiln::v1::AddPathResponse response;
  std::unique_ptr<grpc::ClientWriter<kiln::v1::AddPathChunk>> writer = stub_->AddPath(&context, &response);
  kiln::v1::AddPathChunk chunk;
  *chunk.mutable_info() = info;
  bool stream_broke = false;
  auto send = [&]() -> absl::Status {
    if (!writer->Write(chunk)) {
      stream_broke = true;
      return absl::UnavailableError("the farm store ended the upload");
    }
    chunk.Clear();
    return absl::OkStatus();
  };
  absl::Status written = write_nar([&](absl::string_view bytes) -> absl::Status {
    while (!bytes.empty()) {
      std::string& data = *chunk.mutable_nar();
      const size_t n = std::min(bytes.size(), kChunkBytes - data.size());
      data.append(bytes.data(), n);
      bytes.remove_prefix(n);
      if (data.size() == kChunkBytes) {
        if (absl::Status s = send(); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  });
  if (written.ok() && (chunk.has_info() || !chunk.nar().empty())) written = send();
  if (!written.ok() && !stream_broke) {
    // Our side failed (reading the path): the farm must not keep a part.
    context.TryCancel();
    writer->Finish().IgnoreError();
    return written;
  }
  writer->WritesDone();
  grpc::Status finished = writer->Finish();
  // The server's reason beats "the stream ended"; and a server that ended
  // the stream with OK held the path already (it reads none of it).
  if (!finished.ok()) return FromGrpcStatus(finished);
  if (stream_broke) return absl::OkStatus();
  return written;
}

absl::StatusOr<std::string> GrpcFarmStoreClient::PublicKey() {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(absl::Seconds(10)));
  kiln::v1::CacheInfo info;
  if (grpc::Status s = stub_->GetCacheInfo(&context, kiln::v1::GetCacheInfoRequest(), &info); !s.ok()) {
    return FromGrpcStatus(s);
  }
  return info.public_key();
}

absl::StatusOr<std::string> GrpcFarmStoreClient::NarInfo(const std::string& hash_part) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(absl::Seconds(30)));
  kiln::v1::GetNarInfoRequest request;
  request.set_hash_part(hash_part);
  kiln::v1::GetNarInfoResponse response;
  if (grpc::Status s = stub_->GetNarInfo(&context, request, &response); !s.ok()) return FromGrpcStatus(s);
  return response.narinfo();
}

absl::StatusOr<std::string> FarmStoreClient::FetchNarOrUrl(const std::string& name, NarSink sink) {
  RETURN_IF_ERROR(FetchNar(name, sink));
  return std::string();
}

absl::StatusOr<bool> FarmStoreClient::TakesDirectUploads() { return false; }

absl::StatusOr<kiln::v1::BeginUploadResponse> FarmStoreClient::BeginUpload(const kiln::v1::DirectUpload&) {
  return absl::UnimplementedError("no direct uploads");
}

absl::Status FarmStoreClient::CommitUpload(const kiln::v1::DirectUpload&) {
  return absl::UnimplementedError("no direct uploads");
}

absl::Status GrpcFarmStoreClient::FetchNar(const std::string& name, NarSink sink) {
  return Fetch(name, sink, /*accept_redirect=*/false).status();
}

absl::StatusOr<std::string> GrpcFarmStoreClient::FetchNarOrUrl(const std::string& name, NarSink sink) {
  return Fetch(name, sink, /*accept_redirect=*/true);
}

absl::StatusOr<std::string> GrpcFarmStoreClient::Fetch(const std::string& name, NarSink sink, bool accept_redirect) {
  grpc::ClientContext context;
  // Bounded, yet long enough for a large NAR at a slow pace.
  context.set_deadline(DeadlineIn(absl::Hours(1)));
  kiln::v1::GetNarRequest request;
  request.set_name(name);
  request.set_accept_redirect(accept_redirect);
  std::unique_ptr<grpc::ClientReader<kiln::v1::NarChunk>> reader = stub_->GetNar(&context, request);
  kiln::v1::NarChunk chunk;
  absl::Status sunk = absl::OkStatus();
  std::string url;
  while (reader->Read(&chunk)) {
    if (!chunk.redirect_url().empty()) {
      url = chunk.redirect_url();
      continue;
    }
    sunk = sink(chunk.data());
    if (!sunk.ok()) {
      context.TryCancel();
      break;
    }
  }
  grpc::Status finished = reader->Finish();
  if (!sunk.ok()) return sunk;
  RETURN_IF_ERROR(FromGrpcStatus(finished));
  return url;
}

absl::StatusOr<bool> GrpcFarmStoreClient::TakesDirectUploads() {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(absl::Seconds(10)));
  kiln::v1::CacheInfo info;
  if (grpc::Status s = stub_->GetCacheInfo(&context, kiln::v1::GetCacheInfoRequest(), &info); !s.ok()) {
    return FromGrpcStatus(s);
  }
  return info.direct_upload();
}

absl::StatusOr<kiln::v1::BeginUploadResponse> GrpcFarmStoreClient::BeginUpload(const kiln::v1::DirectUpload& upload) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(absl::Seconds(30)));
  kiln::v1::BeginUploadResponse response;
  if (grpc::Status s = stub_->BeginUpload(&context, upload, &response); !s.ok()) return FromGrpcStatus(s);
  return response;
}

absl::Status GrpcFarmStoreClient::CommitUpload(const kiln::v1::DirectUpload& upload) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(absl::Seconds(60)));
  kiln::v1::AddPathResponse response;
  return FromGrpcStatus(stub_->CommitUpload(&context, upload, &response));
}

}  // namespace kiln
