// The farm store end to end: a real coordinator with --cache-listen, a
// closure of three paths built by real Nix and added through the
// FarmStoreService as a worker adds it, and stock Nix clients, each on a
// private store of its own, substituting it from the binary cache and
// checking the farm's signatures. A client trusting another key, and a NAR
// tampered with on the coordinator's disk, are refused by Nix itself.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "common/narinfo.h"
#include "kiln/v1/store.grpc.pb.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

// Runs a command; its result (the test fails if it could not run).
CommandResult RunOrFail(const ProcessSpec& spec) {
  absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Minutes(2));
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : CommandResult{};
}

std::string Trimmed(const CommandResult& r) { return std::string(absl::StripAsciiWhitespace(r.stdout_data)); }

class FarmStoreE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    farm_.SetCoordinatorFlags({"--cache-listen=127.0.0.1:0"});
    ASSERT_TRUE(farm_.Start().ok());
    ASSERT_FALSE(farm_.cache_address().empty());
    stub_ = kiln::v1::FarmStoreService::NewStub(MakeChannel(farm_.coordinator_address()));
    // c refers to b, b to a: a closure of three.
    const std::string nonce = absl::StrCat(absl::ToUnixNanos(absl::Now()));
    const std::string expr =
        absl::StrCat(R"(
let mk = name: deps: derivation {
  inherit name; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo ${name} ${toString deps} > $out" ];
}; a = mk "a-)",
                     nonce, R"(" []; b = mk "b-)", nonce, R"(" [ a ]; c = mk "c-)", nonce, R"(" [ b ];
in [ a b c ])");
    testing::WriteFileOrDie(work_.Sub("closure.nix"), expr);
    builder_store_ = work_.Sub("builder-nix");
    CommandResult built =
        RunOrFail(testing::OnPrivateStore(builder_store_, {"nix-build", "--no-out-link", work_.Sub("closure.nix")}));
    ASSERT_TRUE(built.exit.Success()) << built.stderr_data;
    for (absl::string_view line : absl::StrSplit(built.stdout_data, '\n', absl::SkipEmpty())) paths_.emplace_back(line);
    ASSERT_EQ(paths_.size(), 3u);
    CommandResult key = RunOrFail({.argv = {testing::BinPath("kiln-coordinator"), "cache", "public-key",
                                            "--state-dir=" + farm_.dir().Sub("coordinator")},
                                   .extra_env = {},
                                   .cwd = ""});
    ASSERT_TRUE(key.exit.Success()) << key.stderr_data;
    public_key_ = Trimmed(key);
  }

  // Adds `path` from the builder's store as a worker does: announce, then
  // the NAR in chunks.
  grpc::Status Add(const std::string& path, kiln::v1::AddPathResponse* response) {
    CommandResult info = RunOrFail(testing::OnPrivateStore(builder_store_, {"nix", "path-info", "--json", path}));
    EXPECT_TRUE(info.exit.Success()) << info.stderr_data;
    const nlohmann::json j = nlohmann::json::parse(info.stdout_data)[0];
    CommandResult nar = RunOrFail(testing::OnPrivateStore(builder_store_, {"nix-store", "--dump", path}));
    grpc::ClientContext context;
    auto writer = stub_->AddPath(&context, response);
    kiln::v1::AddPathChunk first;
    first.mutable_info()->set_store_path(path);
    first.mutable_info()->set_nar_hash(j["narHash"].get<std::string>());
    first.mutable_info()->set_nar_size(j["narSize"].get<uint64_t>());
    for (const auto& r : j["references"]) first.mutable_info()->add_references(r.get<std::string>());
    writer->Write(first);
    for (size_t at = 0; at < nar.stdout_data.size(); at += 100) {  // Small chunks: boundaries anywhere.
      kiln::v1::AddPathChunk chunk;
      chunk.set_nar(nar.stdout_data.substr(at, 100));
      if (!writer->Write(chunk)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  // A stock Nix on a new store of its own realises `path` from the cache,
  // trusting `key`.
  CommandResult Substitute(const std::string& client, const std::string& path, const std::string& key) {
    return RunOrFail(testing::OnPrivateStore(
        work_.Sub(client), {"nix-store", "--realise", path, "--option", "substituters",
                            "http://" + farm_.cache_address(), "--option", "trusted-public-keys", key}));
  }

  testing::LocalFarm farm_{/*workers=*/0};
  testing::TempDir work_;
  std::unique_ptr<kiln::v1::FarmStoreService::Stub> stub_;
  std::string builder_store_;
  std::vector<std::string> paths_;  // a, b, c
  std::string public_key_;
};

TEST_F(FarmStoreE2eTest, AStockNixClientSubstitutesAClosureAndChecksTheFarmsSignatures) {
  kiln::v1::AddPathResponse response;
  // Referrers wait for what they reference: the closure stays whole.
  grpc::Status early = Add(paths_[2], &response);
  EXPECT_EQ(early.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << early.error_message();
  EXPECT_TRUE(absl::StrContains(early.error_message(), "add it first")) << early.error_message();
  for (const std::string& p : paths_) {
    grpc::Status added = Add(p, &response);
    ASSERT_TRUE(added.ok()) << p << ": " << added.error_message();
    EXPECT_FALSE(response.already_held());
  }
  ASSERT_TRUE(Add(paths_[0], &response).ok());
  EXPECT_TRUE(response.already_held());

  CommandResult fetched = Substitute("client-nix", paths_[2], public_key_);
  ASSERT_TRUE(fetched.exit.Success()) << fetched.stderr_data;
  EXPECT_EQ(Trimmed(fetched), paths_[2]);
  // The whole closure arrived, from the cache (nothing could be built: the
  // client never saw the expression), signed by the farm.
  for (const std::string& p : paths_) {
    EXPECT_TRUE(fs::exists(work_.Sub("client-nix") + p.substr(4))) << p;
  }
  CommandResult sigs =
      RunOrFail(testing::OnPrivateStore(work_.Sub("client-nix"), {"nix", "path-info", "--sigs", paths_[0]}));
  EXPECT_TRUE(absl::StrContains(sigs.stdout_data, "kiln-farm-1:")) << sigs.stdout_data;
  EXPECT_EQ(testing::ReadFileOrDie(work_.Sub("client-nix") + paths_[1].substr(4)),
            testing::ReadFileOrDie(builder_store_ + paths_[1].substr(4)));

  // A client that trusts another key takes nothing.
  absl::StatusOr<SigningKey> other = SigningKey::Generate("kiln-farm-1");
  ASSERT_TRUE(other.ok());
  CommandResult distrust = Substitute("distrusting-nix", paths_[0], other->PublicKeyText());
  EXPECT_FALSE(distrust.exit.Success());
  EXPECT_FALSE(
      RunOrFail(testing::OnPrivateStore(work_.Sub("distrusting-nix"), {"nix-store", "--check-validity", paths_[0]}))
          .exit.Success());
}

TEST_F(FarmStoreE2eTest, ANarTamperedWithOnTheFarmsDiskIsRefusedByTheClient) {
  kiln::v1::AddPathResponse response;
  ASSERT_TRUE(Add(paths_[0], &response).ok());
  // The body changes after it was stored (a disk fault, an intruder): it is
  // still valid zstd, but not the NAR the signature covers.
  const fs::path nar_dir = fs::path(farm_.dir().Sub("coordinator")) / "rocksdb" / "nar";
  std::vector<fs::path> bodies;
  for (const auto& e : fs::directory_iterator(nar_dir)) bodies.push_back(e.path());
  ASSERT_EQ(bodies.size(), 1u);
  const std::string other_nar =
      RunOrFail(testing::OnPrivateStore(builder_store_, {"nix-store", "--dump", paths_[1]})).stdout_data;
  absl::StatusOr<CommandResult> compressed =
      RunCommand({.argv = {"zstd", "-q", "-c"}, .extra_env = {}, .cwd = ""}, other_nar, absl::Seconds(30));
  ASSERT_TRUE(compressed.ok() && compressed->exit.Success());
  testing::WriteFileOrDie(bodies[0].string(), compressed->stdout_data);

  CommandResult fetched = Substitute("client-nix", paths_[0], public_key_);
  EXPECT_FALSE(fetched.exit.Success()) << fetched.stdout_data;
  EXPECT_TRUE(absl::StrContains(fetched.stderr_data, "hash mismatch")) << fetched.stderr_data;
  // Not valid in the client's store (Nix may leave the unpacked bytes on
  // disk, unregistered).
  EXPECT_FALSE(RunOrFail(testing::OnPrivateStore(work_.Sub("client-nix"), {"nix-store", "--check-validity", paths_[0]}))
                   .exit.Success());
}

TEST_F(FarmStoreE2eTest, ACoordinatorKilledMidUploadShowsNoPathAndTakesTheNextUpload) {
  // Half of a NAR sent, then `kill -9`.
  CommandResult info = RunOrFail(testing::OnPrivateStore(builder_store_, {"nix", "path-info", "--json", paths_[0]}));
  const nlohmann::json j = nlohmann::json::parse(info.stdout_data)[0];
  const std::string nar =
      RunOrFail(testing::OnPrivateStore(builder_store_, {"nix-store", "--dump", paths_[0]})).stdout_data;
  {
    grpc::ClientContext context;
    kiln::v1::AddPathResponse response;
    auto writer = stub_->AddPath(&context, &response);
    kiln::v1::AddPathChunk first;
    first.mutable_info()->set_store_path(paths_[0]);
    first.mutable_info()->set_nar_hash(j["narHash"].get<std::string>());
    first.mutable_info()->set_nar_size(j["narSize"].get<uint64_t>());
    first.set_nar(nar.substr(0, nar.size() / 2));
    ASSERT_TRUE(writer->Write(first));
    // The coordinator has taken the first half in (its upload file exists).
    const fs::path nar_dir = fs::path(farm_.dir().Sub("coordinator")) / "rocksdb" / "nar";
    bool started = false;
    for (int i = 0; i < 200 && !started; ++i) {
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(nar_dir, ec))
        started |= absl::StartsWith(e.path().filename().string(), ".upload-");
      if (!started) absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_TRUE(started) << "the upload never began";
    farm_.KillCoordinator(SIGKILL);
    context.TryCancel();
  }
  ASSERT_TRUE(farm_.RestartCoordinator().ok());
  stub_ = kiln::v1::FarmStoreService::NewStub(MakeChannel(farm_.coordinator_address()));
  // Nothing of it is visible, nothing of it is left on disk.
  grpc::ClientContext context;
  kiln::v1::QueryMissingRequest query;
  query.add_store_paths(paths_[0]);
  kiln::v1::QueryMissingResponse missing;
  ASSERT_TRUE(stub_->QueryMissing(&context, query, &missing).ok());
  EXPECT_EQ(missing.missing_size(), 1);
  const fs::path nar_dir = fs::path(farm_.dir().Sub("coordinator")) / "rocksdb" / "nar";
  EXPECT_TRUE(fs::is_empty(nar_dir));
  kiln::v1::AddPathResponse response;
  grpc::Status again = Add(paths_[0], &response);
  ASSERT_TRUE(again.ok()) << again.error_message();
  EXPECT_FALSE(response.already_held());
}

}  // namespace
}  // namespace kiln
