// Oversized input against a real coordinator over loopback gRPC: messages
// over the size limit, submissions with too much inline source or too many
// targets, a CAS blob that claims more than the blob limit. Each is refused
// with a clear status, and the coordinator's resident memory does not grow
// with what it refused. An attribute shaped like an option or a shell
// command is refused before any worker sees it.
#include <gtest/gtest.h>

#include "absl/time/clock.h"
#include <sys/types.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/grpc_util.h"
#include "common/source_tree.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/cas.grpc.pb.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

// VmRSS of the process whose command line names `state_dir` (the farm's
// coordinator), in KiB; 0 when not found.
int64_t CoordinatorRssKib(const std::string& state_dir) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string pid = entry.path().filename().string();
    if (pid.empty() || !std::isdigit(static_cast<unsigned char>(pid[0]))) continue;
    std::ifstream cmdline(entry.path() / "cmdline");
    std::string args((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
    if (!absl::StrContains(args, "kiln-coordinator") || !absl::StrContains(args, "--state-dir=" + state_dir)) {
      continue;
    }
    std::ifstream status(entry.path() / "status");
    for (std::string line; std::getline(status, line);) {
      int64_t kib = 0;
      if (absl::StartsWith(line, "VmRSS:") &&
          absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::StripSuffix(line.substr(6), "kB")), &kib)) {
        return kib;
      }
    }
  }
  return 0;
}

TEST(LimitsE2eTest, OversizedInputIsRefusedWithoutTheCoordinatorGrowing) {
  testing::LocalFarm farm(/*workers=*/0);
  farm.SetCoordinatorFlags({"--max-blob-mb=8"});
  ASSERT_TRUE(farm.Start().ok());
  const std::string state_dir = farm.dir().Sub("coordinator");
  // The test's own channel sends more than the coordinator accepts.
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(256 << 20);
  auto channel = grpc::CreateCustomChannel(farm.coordinator_address(), grpc::InsecureChannelCredentials(), args);
  auto builds = kiln::v1::BuildService::NewStub(channel);
  auto cas = kiln::v1::CasService::NewStub(channel);
  const int64_t before = CoordinatorRssKib(state_dir);
  ASSERT_GT(before, 0);

  const std::string big(kMaxGrpcMessageBytes / 4, 'x');  // 20 MiB
  constexpr int kRounds = 8;
  for (int round = 0; round < kRounds; ++round) {
    // A message over gRPC's limit: refused before it is read.
    kiln::v1::SubmitBuildRequest huge;
    for (int i = 0; i < 5; ++i) huge.add_blobs()->set_data(big);
    grpc::ClientContext c1;
    kiln::v1::SubmitBuildResponse r1;
    grpc::Status s1 = builds->SubmitBuild(&c1, huge, &r1);
    EXPECT_EQ(s1.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s1.error_message();

    // Under gRPC's limit but over the inline source limit (64 MiB).
    kiln::v1::SubmitBuildRequest inline_source;
    inline_source.add_targets()->mutable_spec()->set_attr("default");
    for (const std::string& data : {big, big + "1", big + "2", std::string(5 << 20, 'y')}) {
      kiln::v1::Blob* blob = inline_source.add_blobs();
      *blob->mutable_digest() = DigestOf(data);
      blob->set_data(data);
    }
    grpc::ClientContext c2;
    kiln::v1::SubmitBuildResponse r2;
    grpc::Status s2 = builds->SubmitBuild(&c2, inline_source, &r2);
    EXPECT_EQ(s2.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s2.error_message();
    EXPECT_TRUE(absl::StrContains(s2.error_message(), "larger than")) << s2.error_message();

    // Too many targets in one submission.
    kiln::v1::SubmitBuildRequest many;
    for (int i = 0; i < 1001; ++i) many.add_targets()->mutable_spec()->set_attr("default");
    grpc::ClientContext c3;
    kiln::v1::SubmitBuildResponse r3;
    grpc::Status s3 = builds->SubmitBuild(&c3, many, &r3);
    EXPECT_EQ(s3.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s3.error_message();
    EXPECT_TRUE(absl::StrContains(s3.error_message(), "the limit is 1000")) << s3.error_message();

    // A CAS blob whose digest says it is over --max-blob-mb: refused.
    grpc::ClientContext c4;
    kiln::v1::WriteBlobsResponse r4;
    auto writer = cas->WriteBlobs(&c4, &r4);
    kiln::v1::WriteBlobsChunk chunk;
    kiln::v1::Digest digest = DigestOf(big);
    digest.set_size_bytes(64 << 20);
    *chunk.mutable_digest() = digest;
    chunk.set_data(big.substr(0, 1 << 20));
    writer->Write(chunk);
    writer->WritesDone();
    grpc::Status s4 = writer->Finish();
    EXPECT_FALSE(s4.ok());
    EXPECT_TRUE(s4.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
                s4.error_code() == grpc::StatusCode::INVALID_ARGUMENT)
        << s4.error_message();
  }
  // What was refused is not kept. The allocator holds on to freed pages for
  // a while (per arena, and gRPC reads on more than one thread), so memory
  // rises to a plateau of a few requests; kept requests would add ~90 MiB a
  // round, 700 MiB over the eight.
  const int64_t after = CoordinatorRssKib(state_dir);
  EXPECT_LT(after - before, 320 * 1024) << "RSS " << before << " -> " << after << " KiB over " << kRounds << " rounds";
}

TEST(LimitsE2eTest, AnAttributeThatCouldBeAnOptionOrShellIsRefusedBeforeAnyWorkerSeesIt) {
  // Straight to the coordinator, past the CLI's own check; a worker is
  // connected, and its log shows it never ran Nix for these.
  testing::LocalFarm farm(/*workers=*/1);
  ASSERT_TRUE(farm.Start().ok());
  auto builds = kiln::v1::BuildService::NewStub(MakeChannel(farm.coordinator_address()));
  const std::string flake = "{ outputs = _: {}; }";
  kiln::v1::Directory root;
  auto* file = root.add_files();
  file->set_name("flake.nix");
  *file->mutable_digest() = DigestOf(flake);
  const std::string root_blob = SerializeDirectory(root);
  for (const std::string attr : {"--option", "-L", "a;rm -rf /", "$(touch /tmp/x)", "a b", "a\nb", "..", "a.", ""}) {
    kiln::v1::SubmitBuildRequest request;
    for (const std::string& data : {flake, root_blob}) {
      auto* blob = request.add_blobs();
      *blob->mutable_digest() = DigestOf(data);
      blob->set_data(data);
    }
    auto* spec = request.add_targets()->mutable_spec();
    *spec->mutable_source()->mutable_tree_root() = DigestOf(root_blob);
    spec->set_attr(attr);
    spec->mutable_requirements()->set_system("x86_64-linux");
    grpc::ClientContext context;
    kiln::v1::SubmitBuildResponse response;
    grpc::Status status = builds->SubmitBuild(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << "'" << attr << "'";
    EXPECT_TRUE(response.job_ids().empty());
  }
  // The worker registers on its own schedule (its ready file comes first):
  // wait for it, bounded, so that "never ran Nix" means something.
  std::string log;
  for (int i = 0; i < 100; ++i) {
    log = testing::ReadFileOrDie(farm.LogOf("worker-1"));
    if (absl::StrContains(log, "registered with")) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_FALSE(absl::StrContains(log, "--option")) << log;
  EXPECT_FALSE(absl::StrContains(log, "rm -rf")) << log;
  EXPECT_TRUE(absl::StrContains(log, "registered with")) << log;
  EXPECT_FALSE(absl::StrContains(log, " attempt ")) << log;  // The line each assignment starts with.
}

}  // namespace
}  // namespace kiln
