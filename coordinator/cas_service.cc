#include "coordinator/rocks_status.h"
#include "coordinator/cas_service.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"
#include "common/source_tree.h"

namespace kiln {

using kiln::v1::Digest;

grpc::Status CasServiceImpl::FindMissingBlobs(grpc::ServerContext* context,
                                              const kiln::v1::FindMissingBlobsRequest* request,
                                              kiln::v1::FindMissingBlobsResponse* response) {
  if (auto caller = Authorize(auth_, *context, Scope::kBlobs); !caller.ok()) return ToGrpcStatus(caller.status());
  if (static_cast<size_t>(request->files_size() + request->directories_size()) > limits_.max_digests_per_request) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("more than ", limits_.max_digests_per_request, " digests in one request"));
  }
  uint64_t skipped = 0;
  for (const Digest& d : request->files()) {
    if (cas_->HasFile(d)) {
      skipped += static_cast<uint64_t>(d.size_bytes());
    } else {
      *response->add_missing_files() = d;
    }
  }
  for (const Digest& d : request->directories()) {
    if (absl::StatusOr<kiln::state::v1::BlobMeta> meta = cas_->Meta(d.hash());
        meta.ok() && meta->is_directory() && meta->size_bytes() == d.size_bytes()) {
      skipped += static_cast<uint64_t>(meta->tree_bytes());  // The whole tree need not travel.
    } else {
      *response->add_missing_directories() = d;
    }
  }
  metrics_->cas_skipped_bytes.Increment(static_cast<double>(skipped));
  return grpc::Status::OK;
}

grpc::Status CasServiceImpl::WriteBlobs(grpc::ServerContext* context,
                                        grpc::ServerReader<kiln::v1::WriteBlobsChunk>* reader,
                                        kiln::v1::WriteBlobsResponse* response) {
  if (auto caller = Authorize(auth_, *context, Scope::kBlobs); !caller.ok()) return ToGrpcStatus(caller.status());
  kiln::v1::WriteBlobsChunk chunk;
  std::unique_ptr<CasStore::Upload> upload;
  Digest current;
  uint64_t total = 0;
  const auto reject = [&](const absl::Status& s) {
    metrics_->cas_rejected_blobs.Increment();
    if (IsDiskFull(s)) {
      return ToGrpcStatus(absl::ResourceExhaustedError(
          absl::StrCat(kCoordinatorOutOfSpace, ": it cannot store the uploaded source (", s.message(),
                       "); retry once space is freed on its state directory")));
    }
    return ToGrpcStatus(s);
  };
  while (reader->Read(&chunk)) {
    if (chunk.has_digest()) {
      if (upload) {
        return reject(absl::InvalidArgumentError(absl::StrCat("blob ", current.hash(), " has no last chunk")));
      }
      absl::StatusOr<std::unique_ptr<CasStore::Upload>> started =
          cas_->StartUpload(chunk.digest(), chunk.is_directory());
      if (!started.ok()) return reject(started.status());
      upload = *std::move(started);
      current = chunk.digest();
    } else if (!upload) {
      return reject(absl::InvalidArgumentError("a chunk before any blob's digest"));
    }
    total += chunk.data().size();
    if (total > limits_.max_upload_bytes) {
      return reject(absl::ResourceExhaustedError(
          absl::StrCat("upload is over the limit of ", limits_.max_upload_bytes, " bytes per call")));
    }
    if (absl::Status s = upload->Append(chunk.data()); !s.ok()) return reject(s);
    if (!chunk.last()) continue;
    if (absl::Status s = upload->Finish(); !s.ok()) return reject(s);
    if (upload->already_present()) {
      response->set_blobs_already_present(response->blobs_already_present() + 1);
    } else {
      response->set_blobs_stored(response->blobs_stored() + 1);
      response->set_bytes_stored(response->bytes_stored() + current.size_bytes());
      metrics_->cas_uploaded_blobs.Increment();
      metrics_->cas_uploaded_bytes.Increment(static_cast<double>(current.size_bytes()));
    }
    upload.reset();
  }
  if (upload) return reject(absl::InvalidArgumentError(absl::StrCat("blob ", current.hash(), " was cut short")));
  return grpc::Status::OK;
}

grpc::Status CasServiceImpl::ReadBlobs(grpc::ServerContext* context, const kiln::v1::ReadBlobsRequest* request,
                                       grpc::ServerWriter<kiln::v1::ReadBlobsChunk>* writer) {
  if (auto caller = Authorize(auth_, *context, Scope::kRead); !caller.ok()) return ToGrpcStatus(caller.status());
  if (static_cast<size_t>(request->digests_size()) > limits_.max_digests_per_request) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("more than ", limits_.max_digests_per_request, " digests in one request"));
  }
  for (const Digest& d : request->digests()) {
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "reader went away");
    int64_t offset = 0;
    bool first = true;
    kiln::v1::ReadBlobsChunk out;
    absl::Status s = cas_->Read(d.hash(), [&](absl::string_view data) {
      // Several small blobs could share a message, but one message per
      // chunk keeps memory bounded and the code plain.
      out.Clear();
      if (first) *out.mutable_digest() = d;
      first = false;
      out.set_offset(offset);
      out.set_data(data.data(), data.size());
      offset += static_cast<int64_t>(data.size());
      out.set_last(offset == d.size_bytes());
      if (!writer->Write(out)) return absl::CancelledError("reader went away");
      metrics_->cas_downloaded_bytes.Increment(static_cast<double>(data.size()));
      return absl::OkStatus();
    });
    if (!s.ok()) return ToGrpcStatus(s);
    if (first || offset != d.size_bytes()) {
      // An empty blob (no chunk written), or a size that does not match.
      if (offset != d.size_bytes()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("blob ", d.hash(), " has ", offset, " bytes, not ", d.size_bytes()));
      }
      out.Clear();
      *out.mutable_digest() = d;
      out.set_last(true);
      if (!writer->Write(out)) return grpc::Status(grpc::StatusCode::CANCELLED, "reader went away");
    }
  }
  return grpc::Status::OK;
}

grpc::Status CasServiceImpl::GetTree(grpc::ServerContext* context, const kiln::v1::GetTreeRequest* request,
                                     kiln::v1::GetTreeResponse* response) {
  if (auto caller = Authorize(auth_, *context, Scope::kRead); !caller.ok()) return ToGrpcStatus(caller.status());
  absl::flat_hash_map<std::string, std::string> read;
  absl::Status error;
  const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    if (auto it = read.find(hash); it != read.end()) return &it->second;
    absl::StatusOr<std::string> blob = cas_->ReadAll(hash);
    if (!blob.ok()) {
      if (!absl::IsNotFound(blob.status())) error = blob.status();
      return nullptr;
    }
    return &read.emplace(hash, *std::move(blob)).first->second;
  };
  SourceTreeLimits limits;
  limits.max_total_bytes = UINT64_MAX;  // File blobs are not read here.
  // Any stored tree (build outputs link anywhere); readers check their own.
  limits.allow_external_links = true;
  limits.max_entries = uint64_t{1} << 24;
  limits.max_entries_per_directory = uint64_t{1} << 20;
  limits.max_depth = 256;
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
      CollectTreeDirectories(request->root(), lookup, limits);
  if (!error.ok()) return ToGrpcStatus(error);
  if (!dirs.ok()) return ToGrpcStatus(dirs.status());
  for (auto& [hash, data] : *dirs) {
    kiln::v1::Blob* blob = response->add_directories();
    blob->mutable_digest()->set_hash(hash);
    blob->mutable_digest()->set_size_bytes(static_cast<int64_t>(data.size()));
    blob->set_data(std::move(data));
  }
  return grpc::Status::OK;
}

}  // namespace kiln
