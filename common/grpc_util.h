// Conversions at the gRPC edge: absl::Status <-> grpc::Status, absl::Time <->
// protobuf Timestamp/Duration, and the channel settings both ends share.
#pragma once

#include <memory>
#include <string>

#include <google/protobuf/duration.pb.h>
#include <google/protobuf/timestamp.pb.h>
#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace kiln {

// Largest message either side accepts. Assignments carry a source tree
// inline, so this is above the default 4 MiB.
inline constexpr int kMaxGrpcMessageBytes = 80 << 20;

// How the coordinator's refusals for lack of disk space begin (their code is
// RESOURCE_EXHAUSTED, as for quotas): clients tell them apart by it and exit
// with a code of their own.
inline constexpr absl::string_view kCoordinatorOutOfSpace = "the coordinator is out of disk space";

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

google::protobuf::Timestamp ToProtoTime(absl::Time t);
absl::Time FromProtoTime(const google::protobuf::Timestamp& t);
google::protobuf::Duration ToProtoDuration(absl::Duration d);
absl::Duration FromProtoDuration(const google::protobuf::Duration& d);

// A channel with Kiln's message limits and keepalive settings; plaintext
// unless `credentials` (see common/tls.h) say otherwise.
// With `bearer_token`, every call carries `authorization: Bearer TOKEN`.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr,
                                           const std::string& bearer_token = "");

}  // namespace kiln
