// The coordinator's gRPC services (callback API). Each reaction does only
// what cannot block — copy the message, post to the strand, arm the next
// read — and every write goes through an OutboundQueue, so a slow client or
// worker never stalls the strand.
#pragma once

#include <memory>

#include "common/serial_executor.h"
#include "coordinator/auth.h"
#include "coordinator/build_coordinator.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/farm.grpc.pb.h"
#include "kiln/v1/workers.grpc.pb.h"

namespace kiln {

class BuildServiceImpl final : public kiln::v1::BuildService::CallbackService {
 public:
  // `core`, `strand` and `auth` must outlive the server; `auth` null: no
  // checks (in-process tests).
  // `store` (may be null: no stored logs) serves finished jobs' logs, read
  // on `reader` (null: on the calling thread, for in-process tests).
  BuildServiceImpl(BuildCoordinator* core, SerialExecutor* strand, const Authorizer* auth = nullptr,
                   StateStore* store = nullptr, SerialExecutor* reader = nullptr)
      : core_(core), strand_(strand), auth_(auth), store_(store), reader_(reader) {}

  grpc::ServerUnaryReactor* SubmitBuild(grpc::CallbackServerContext* context,
                                        const kiln::v1::SubmitBuildRequest* request,
                                        kiln::v1::SubmitBuildResponse* response) override;
  grpc::ServerWriteReactor<kiln::v1::JobEvent>* WatchJob(grpc::CallbackServerContext* context,
                                                         const kiln::v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context, const kiln::v1::CancelJobRequest* request,
                                      kiln::v1::CancelJobResponse* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context, const kiln::v1::GetJobRequest* request,
                                   kiln::v1::Job* response) override;
  grpc::ServerUnaryReactor* GetBuildset(grpc::CallbackServerContext* context,
                                        const kiln::v1::GetBuildsetRequest* request,
                                        kiln::v1::Buildset* response) override;
  grpc::ServerUnaryReactor* CancelBuildset(grpc::CallbackServerContext* context,
                                           const kiln::v1::CancelBuildsetRequest* request,
                                           kiln::v1::Buildset* response) override;
  grpc::ServerUnaryReactor* GetJobLog(grpc::CallbackServerContext* context, const kiln::v1::GetJobLogRequest* request,
                                      kiln::v1::GetJobLogResponse* response) override;
  grpc::ServerUnaryReactor* ListBuildsets(grpc::CallbackServerContext* context,
                                          const kiln::v1::ListBuildsetsRequest* request,
                                          kiln::v1::ListBuildsetsResponse* response) override;

 private:
  BuildCoordinator* const core_;
  SerialExecutor* const strand_;
  const Authorizer* const auth_;
  StateStore* const store_;
  SerialExecutor* const reader_;
};

class WorkerServiceImpl final : public kiln::v1::WorkerService::CallbackService {
 public:
  // `sender` starts the writes to workers (see WorkerStreamSession::Send).
  // `auth` decides who may connect as a worker; a worker that showed a
  // certificate is known by its common name, whatever it registers as.
  WorkerServiceImpl(BuildCoordinator* core, SerialExecutor* strand, SerialExecutor* sender,
                    const Authorizer* auth = nullptr)
      : core_(core), strand_(strand), sender_(sender), auth_(auth) {}

  grpc::ServerBidiReactor<kiln::v1::WorkerMessage, kiln::v1::CoordinatorMessage>* Connect(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* SendLogs(grpc::CallbackServerContext* context, const kiln::v1::LogBatch* request,
                                     kiln::v1::LogBatchAck* response) override;

 private:
  BuildCoordinator* const core_;
  SerialExecutor* const strand_;
  SerialExecutor* const sender_;
  const Authorizer* const auth_;
};

class FarmServiceImpl final : public kiln::v1::FarmService::CallbackService {
 public:
  FarmServiceImpl(BuildCoordinator* core, SerialExecutor* strand, const Authorizer* auth = nullptr)
      : core_(core), strand_(strand), auth_(auth) {}

  grpc::ServerUnaryReactor* ListWorkers(grpc::CallbackServerContext* context,
                                        const kiln::v1::ListWorkersRequest* request,
                                        kiln::v1::ListWorkersResponse* response) override;
  grpc::ServerUnaryReactor* DrainWorker(grpc::CallbackServerContext* context,
                                        const kiln::v1::DrainWorkerRequest* request,
                                        kiln::v1::DrainWorkerResponse* response) override;

 private:
  BuildCoordinator* const core_;
  SerialExecutor* const strand_;
  const Authorizer* const auth_;
};

}  // namespace kiln
