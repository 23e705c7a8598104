// Standard gRPC tooling against a real coordinator over loopback: the
// health-checking service answers SERVING, and server reflection lists
// Kiln's services (what grpcurl and grpc_cli ask first).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common/grpc_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

TEST(HealthE2eTest, HealthCheckingAndReflectionWorkWithStandardClients) {
  testing::LocalFarm farm(/*workers=*/0);
  ASSERT_TRUE(farm.Start().ok());
  auto channel = MakeChannel(farm.coordinator_address());

  auto health = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext health_context;
  health_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest request;  // "": the server as a whole.
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health->Check(&health_context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  auto reflection = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext reflection_context;
  reflection_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto stream = reflection->ServerReflectionInfo(&reflection_context);
  grpc::reflection::v1alpha::ServerReflectionRequest list;
  list.set_list_services("*");
  ASSERT_TRUE(stream->Write(list));
  grpc::reflection::v1alpha::ServerReflectionResponse listed;
  ASSERT_TRUE(stream->Read(&listed));
  stream->WritesDone();
  std::vector<std::string> names;
  for (const auto& service : listed.list_services_response().service()) names.push_back(service.name());
  for (const char* expected :
       {"kiln.v1.BuildService", "kiln.v1.WorkerService", "kiln.v1.CasService", "kiln.v1.FodService",
        "kiln.v1.FarmService", "kiln.v1.AdminService", "grpc.health.v1.Health"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), expected), names.end()) << expected;
  }
  EXPECT_TRUE(stream->Finish().ok());
}

}  // namespace
}  // namespace kiln
