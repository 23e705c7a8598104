// DirectUploadClient: the worker's farm-store client when the farm keeps its
// NARs in object storage. A decorator over the gRPC client: AddPath then
// compresses the NAR here, checks it is the NAR Nix describes, PUTs it to a
// presigned URL the coordinator hands out (BeginUpload) and asks the
// coordinator to make the path valid (CommitUpload), so the bytes go from
// the worker to the bucket, not through the coordinator. When the farm keeps
// NARs on its own disk, AddPath streams to it as before. Everything else is
// passed through.
//
// Thread-safe.
#pragma once

#include <string>

#include "absl/synchronization/mutex.h"
#include "common/clock.h"
#include "common/farm_store_client.h"

namespace kiln {

class DirectUploadClient final : public FarmStoreClient {
 public:
  // How long the farm's answer to "direct uploads?" is kept.
  static constexpr absl::Duration kModeLifetime = absl::Minutes(1);

  // `inner` and `clock` outlive this; bodies are staged in `staging_dir`
  // (created).
  DirectUploadClient(FarmStoreClient* inner, std::string staging_dir, const Clock* clock = RealClock::Get());

  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& store_paths) override {
    return inner_->Missing(store_paths);
  }
  absl::Status AddPath(const kiln::v1::PathInfo& info,
                       absl::FunctionRef<absl::Status(NarSink sink)> write_nar) override;
  absl::StatusOr<std::string> PublicKey() override { return inner_->PublicKey(); }
  absl::StatusOr<std::string> NarInfo(const std::string& hash_part) override { return inner_->NarInfo(hash_part); }
  absl::Status FetchNar(const std::string& name, NarSink sink) override { return inner_->FetchNar(name, sink); }
  absl::StatusOr<std::string> FetchNarOrUrl(const std::string& name, NarSink sink) override {
    return inner_->FetchNarOrUrl(name, sink);
  }
  absl::StatusOr<bool> TakesDirectUploads() override;

  // Uploads that went straight to object storage so far.
  uint64_t direct_uploads() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Status UploadDirect(const kiln::v1::PathInfo& info, absl::FunctionRef<absl::Status(NarSink sink)> write_nar);

  FarmStoreClient* const inner_;
  const std::string staging_dir_;
  const Clock* const clock_;
  mutable absl::Mutex mu_;
  bool direct_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time mode_expires_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  uint64_t direct_uploads_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kiln
