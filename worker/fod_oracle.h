// FodOracle: what a worker asks the fleet's FOD hash cache. The real one
// calls the coordinator's FodService; tests may substitute their own.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "kiln/v1/fod.grpc.pb.h"

namespace kiln {

class FodOracle {
 public:
  virtual ~FodOracle() = default;
  // One verdict per FOD, in order. Thread-safe.
  virtual absl::StatusOr<std::vector<kiln::v1::FodVerdict>> Check(const std::vector<kiln::v1::FodRef>& fods,
                                                                  const std::string& job_id) = 0;
  // Reports what builds found. Thread-safe.
  virtual absl::Status Record(const std::vector<kiln::v1::FodOutcome>& outcomes, const std::string& job_id) = 0;
};

class GrpcFodOracle final : public FodOracle {
 public:
  GrpcFodOracle(std::shared_ptr<grpc::Channel> channel, std::string worker_name);

  absl::StatusOr<std::vector<kiln::v1::FodVerdict>> Check(const std::vector<kiln::v1::FodRef>& fods,
                                                          const std::string& job_id) override;
  absl::Status Record(const std::vector<kiln::v1::FodOutcome>& outcomes, const std::string& job_id) override;

 private:
  std::unique_ptr<kiln::v1::FodService::Stub> stub_;
  const std::string worker_name_;
};

}  // namespace kiln
