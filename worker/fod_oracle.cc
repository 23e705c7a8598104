#include "worker/fod_oracle.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_util.h"

namespace kiln {
namespace {

// A lookup sits in front of every build: it must not hold one up for long
// when the coordinator is slow. A build without verdicts still runs.
constexpr auto kCallTimeout = std::chrono::seconds(10);

}  // namespace

GrpcFodOracle::GrpcFodOracle(std::shared_ptr<grpc::Channel> channel, std::string worker_name)
    : stub_(kiln::v1::FodService::NewStub(std::move(channel))), worker_name_(std::move(worker_name)) {}

absl::StatusOr<std::vector<kiln::v1::FodVerdict>> GrpcFodOracle::Check(const std::vector<kiln::v1::FodRef>& fods,
                                                                       const std::string& job_id) {
  kiln::v1::CheckFodsRequest request;
  for (const auto& f : fods) *request.add_fods() = f;
  request.set_job_id(job_id);
  kiln::v1::CheckFodsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + kCallTimeout);
  grpc::Status s = stub_->CheckFods(&context, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  if (response.verdicts_size() != request.fods_size()) {
    return absl::InternalError(
        absl::StrCat("FOD cache answered ", response.verdicts_size(), " verdicts for ", request.fods_size(), " FODs"));
  }
  return std::vector<kiln::v1::FodVerdict>(response.verdicts().begin(), response.verdicts().end());
}

absl::Status GrpcFodOracle::Record(const std::vector<kiln::v1::FodOutcome>& outcomes, const std::string& job_id) {
  kiln::v1::RecordFodsRequest request;
  for (const auto& o : outcomes) *request.add_outcomes() = o;
  request.set_job_id(job_id);
  request.set_worker(worker_name_);
  kiln::v1::RecordFodsResponse response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + kCallTimeout);
  return FromGrpcStatus(stub_->RecordFods(&context, request, &response));
}

}  // namespace kiln
