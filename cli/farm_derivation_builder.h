// FarmDerivationBuilder: the gateway's DerivationBuilder. A derivation a
// Nix client sends becomes one farm job (JobSpec.derivation): scheduled
// like any job (its system, its requiredSystemFeatures, the interactive
// class), built on a worker by that worker's own nix-store --serve with its
// inputs substituted from the farm store, its outputs uploaded there, and
// its log streamed back to the client as it comes.
//
// A client that hangs up while its job runs has the job cancelled (outputs
// already built stay in the farm store).
//
// A fixed-output derivation is looked up in the fleet's FOD cache first
// (its key is the same whether `kiln build` read it from a .drv or a
// client sent it): one declared with a hash the cache knows to be wrong — a
// fake or a stale one — fails at once with the right hash and `kiln
// build`'s message, and no job runs. One whose hash was computed for other
// inputs is built and the client warned.
//
// The inputs must be in the farm store first (Nix sends them with
// add-to-store-nar before it asks for a build); a build whose inputs the
// farm lacks fails at once, saying which.
#pragma once

#include <memory>
#include <optional>

#include "cli/cli.h"
#include "cli/serve_nix.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/fod.grpc.pb.h"

namespace grpc {
class Channel;
}  // namespace grpc

namespace kiln {

class FarmDerivationBuilder final : public DerivationBuilder {
 public:
  // `farm` outlives this. While a job runs, `hangup_fd` (the session's
  // stdin; -1: none) is watched: the client hanging up (Ctrl-C, a dropped
  // SSH connection) cancels the job.
  FarmDerivationBuilder(std::shared_ptr<grpc::Channel> channel, FarmStoreClient& farm, CliOptions options,
                        int hangup_fd = -1);

  absl::StatusOr<ServeBuildResult> Build(const std::string& drv_path, const ServeDerivation& drv,
                                         const ServeBuildOptions& options,
                                         absl::FunctionRef<void(absl::string_view line)> log) override;

 private:
  // The client's failure when the FOD cache knows `drv`'s declared hash to
  // be wrong; nothing otherwise (also when the cache cannot be asked).
  std::optional<ServeBuildResult> FailFastFod(const std::string& drv_path, const ServeDerivation& drv,
                                              absl::FunctionRef<void(absl::string_view line)> log);

  std::unique_ptr<kiln::v1::BuildService::Stub> stub_;
  std::unique_ptr<kiln::v1::FodService::Stub> fods_;
  FarmStoreClient& farm_;
  const CliOptions options_;
  const int hangup_fd_;
};

// The job a derivation becomes (exposed for tests).
kiln::v1::JobSpec DerivationJobSpec(const std::string& drv_path, const ServeDerivation& drv,
                                    const ServeBuildOptions& options, const std::string& priority_class);

}  // namespace kiln
