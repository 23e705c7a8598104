#include "worker/direct_upload_client.h"

#include <unistd.h>

#include <filesystem>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/http_request.h"
#include "common/nar_file.h"
#include "common/nix_hash.h"
#include "common/status_macros.h"

namespace kiln {

DirectUploadClient::DirectUploadClient(FarmStoreClient* inner, std::string staging_dir, const Clock* clock)
    : inner_(inner), staging_dir_(std::move(staging_dir)), clock_(clock) {
  std::error_code ec;
  std::filesystem::create_directories(staging_dir_, ec);  // A failure shows at the first upload.
  for (const auto& entry : std::filesystem::directory_iterator(staging_dir_, ec)) {
    std::filesystem::remove(entry.path(), ec);  // Left by a worker that stopped mid-upload.
  }
}

absl::StatusOr<bool> DirectUploadClient::TakesDirectUploads() {
  const absl::Time now = clock_->Now();
  {
    absl::MutexLock lock(&mu_);
    if (now < mode_expires_) return direct_;
  }
  absl::StatusOr<bool> direct = inner_->TakesDirectUploads();
  if (absl::IsUnimplemented(direct.status())) direct = false;  // A coordinator from before object storage.
  if (!direct.ok()) return direct.status();
  absl::MutexLock lock(&mu_);
  direct_ = *direct;
  mode_expires_ = now + kModeLifetime;
  return direct_;
}

uint64_t DirectUploadClient::direct_uploads() const {
  absl::MutexLock lock(&mu_);
  return direct_uploads_;
}

absl::Status DirectUploadClient::AddPath(const kiln::v1::PathInfo& info,
                                         absl::FunctionRef<absl::Status(NarSink sink)> write_nar) {
  ASSIGN_OR_RETURN(bool direct, TakesDirectUploads());
  if (!direct) return inner_->AddPath(info, write_nar);
  return UploadDirect(info, write_nar);
}

absl::Status DirectUploadClient::UploadDirect(const kiln::v1::PathInfo& info,
                                              absl::FunctionRef<absl::Status(NarSink sink)> write_nar) {
  ASSIGN_OR_RETURN(std::unique_ptr<NarFileWriter> writer, NarFileWriter::Create(staging_dir_));
  RETURN_IF_ERROR(write_nar([&](absl::string_view bytes) { return writer->Write(bytes); }));
  ASSIGN_OR_RETURN(CompressedNar nar, writer->Finish(/*sync=*/false));
  absl::Cleanup remove = [&] { ::unlink(nar.file.c_str()); };
  // The coordinator will not read these bytes: they must be the NAR Nix
  // describes (a store damaged under Nix's feet is caught here).
  ASSIGN_OR_RETURN(NixHash claimed, ParseNixHash(info.nar_hash()));
  if (nar.nar_size != info.nar_size() || absl::StrCat("sha256:", claimed.Base32()) != nar.nar_hash) {
    return absl::DataLossError(absl::StrCat("the NAR of ", info.store_path(), " is ", nar.nar_size, " bytes, ",
                                            nar.nar_hash, "; Nix says ", info.nar_size(), " bytes, ", info.nar_hash()));
  }
  kiln::v1::DirectUpload upload;
  *upload.mutable_info() = info;
  upload.set_file_hash(nar.file_hash);
  upload.set_file_size(nar.file_size);
  ASSIGN_OR_RETURN(kiln::v1::BeginUploadResponse begun, inner_->BeginUpload(upload));
  if (begun.already_held()) return absl::OkStatus();
  HttpRequest put;
  put.method = "PUT";
  put.url = begun.put_url();
  put.body_file = nar.file;
  put.headers.push_back("Content-Type: application/x-nix-nar");
  put.timeout = absl::Minutes(1) + absl::Seconds(static_cast<double>(nar.file_size >> 22));
  ASSIGN_OR_RETURN(HttpResponse response, SendHttp(put));
  if (response.status != 200) {
    const std::string what =
        absl::StrCat("object storage refused the body of ", info.store_path(), ": HTTP ", response.status);
    return response.status >= 500 ? absl::UnavailableError(what) : absl::InternalError(what);
  }
  RETURN_IF_ERROR(inner_->CommitUpload(upload));
  absl::MutexLock lock(&mu_);
  ++direct_uploads_;
  return absl::OkStatus();
}

}  // namespace kiln
