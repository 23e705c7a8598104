// The build-derivation encodings against the real Nix 2.8: a derivation
// instantiated in one private store is sent, as ServeWriter writes it with
// the build options, to `nix-store --serve --write` on another (an empty
// "remote"), whose reply ServeReader reads as a BuildResult: a builder
// that succeeds is Built with its output there, one that fails is a
// PermanentFailure with Nix's message.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/serve_protocol.h"
#include "common/subprocess.h"
#include "tests/support/local_farm.h"
#include "tests/support/serve_derivation_json.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

// The derivation `expr` instantiates, as build-derivation carries it.
std::pair<std::string, ServeDerivation> Instantiate(const testing::TempDir& dir, const std::string& expr) {
  testing::WriteFileOrDie(dir.Sub("expr.nix"), expr);
  absl::StatusOr<CommandResult> drv =
      RunCommand(testing::OnPrivateStore(dir.Sub("client-nix"), {"nix-instantiate", dir.Sub("expr.nix")}));
  EXPECT_TRUE(drv.ok() && drv->exit.Success()) << (drv.ok() ? drv->stderr_data : drv.status().ToString());
  const std::string drv_path(absl::StripAsciiWhitespace(drv->stdout_data));
  absl::StatusOr<CommandResult> shown =
      RunCommand(testing::OnPrivateStore(dir.Sub("client-nix"), {"nix", "show-derivation", drv_path}));
  EXPECT_TRUE(shown.ok() && shown->exit.Success());
  const nlohmann::json j = nlohmann::json::parse(shown->stdout_data)[drv_path];
  return {drv_path, testing::ServeDerivationFromJson(j)};
}

ServeBuildResult BuildOnRemote(const testing::TempDir& dir, const std::string& drv_path, const ServeDerivation& d) {
  ServeWriter session;
  session.U64(kServeMagic1).U64(kServeProtocolVersion);
  session.U64(static_cast<uint64_t>(ServeCommand::kBuildDerivation)).String(drv_path);
  WriteServeDerivation(session, d);
  WriteServeBuildOptions(session, ServeBuildOptions{.max_silent_time = 60, .build_timeout = 120},
                         kServeProtocolVersion);
  // As a client does: stdin stays open while the build runs (Nix takes a
  // hang-up for the client going away and stops the build).
  absl::StatusOr<Spawned> child = SpawnWithPipes(
      testing::OnPrivateStore(dir.Sub("remote-nix"), {"nix-store", "--serve", "--write"}), /*want_stdin=*/true,
      /*stderr_to_null=*/true);
  EXPECT_TRUE(child.ok()) << child.status();
  if (!child.ok()) return {};
  EXPECT_EQ(::write(child->stdin_fd, session.data().data(), session.data().size()),
            static_cast<ssize_t>(session.data().size()));
  ServeReader reader([fd = child->stdout_fd](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const ssize_t n = ::read(fd, buf, size);
    if (n < 0) return absl::InternalError("read");
    return static_cast<size_t>(n);
  });
  EXPECT_EQ(*reader.U64(), kServeMagic2);
  EXPECT_EQ(ServeMajor(*reader.U64()), 0x200u);
  absl::StatusOr<ServeBuildResult> result = ReadServeBuildResult(reader, kServeProtocolVersion);
  EXPECT_TRUE(result.ok()) << result.status();
  ::close(child->stdin_fd);  // Done: the server sees the end and exits.
  EXPECT_TRUE(absl::IsOutOfRange(reader.U64().status())) << "nothing after the result";
  ::close(child->stdout_fd);
  int wstatus = 0;
  ::waitpid(child->pid, &wstatus, 0);
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
  return result.ok() ? *result : ServeBuildResult{};
}

TEST(ServeProtocolNixTest, ARealNixBuildsWhatWeSendAndWeReadItsResult) {
  testing::TempDir dir;
  auto [drv_path, drv] = Instantiate(dir, R"(derivation {
  name = "served"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo built-by-serve > $out" ];
})");
  ASSERT_EQ(drv.outputs.size(), 1u);
  const ServeBuildResult r = BuildOnRemote(dir, drv_path, drv);
  EXPECT_EQ(r.status, ServeBuildStatus::kBuilt) << r.error_msg;
  EXPECT_EQ(r.times_built, 1u);
  EXPECT_LE(r.start_time, r.stop_time);
  EXPECT_GT(r.start_time, 1700000000u);
  // What Nix 2.8 itself says of the built output: the form
  // ServeBuiltOutputs writes for the gateway (id ending "!out", the path).
  ASSERT_EQ(r.built_outputs.size(), 1u);
  EXPECT_TRUE(absl::EndsWith(r.built_outputs[0].first, "!out")) << r.built_outputs[0].first;
  EXPECT_TRUE(absl::StrContains(r.built_outputs[0].second, drv.outputs[0].path.substr(11)))
      << r.built_outputs[0].second;
  std::ifstream built(dir.Sub("remote-nix/store/") + drv.outputs[0].path.substr(11));
  std::string line;
  std::getline(built, line);
  EXPECT_EQ(line, "built-by-serve");

  // The same encodings written back read the same.
  ServeWriter w;
  WriteServeDerivation(w, drv);
  WriteServeBuildResult(w, r, kServeProtocolVersion);
  size_t at = 0;
  const std::string bytes = w.data();
  ServeReader again([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min(size, bytes.size() - at);
    std::memcpy(buf, bytes.data() + at, n);
    at += n;
    return n;
  });
  absl::StatusOr<ServeDerivation> d2 = ReadServeDerivation(again);
  ASSERT_TRUE(d2.ok());
  EXPECT_EQ(d2->env, drv.env);
  EXPECT_EQ(d2->outputs[0].path, drv.outputs[0].path);
  absl::StatusOr<ServeBuildResult> r2 = ReadServeBuildResult(again, kServeProtocolVersion);
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r2->stop_time, r.stop_time);
}

TEST(ServeProtocolNixTest, AFailingBuilderIsAPermanentFailureWithNixsMessage) {
  testing::TempDir dir;
  auto [drv_path, drv] = Instantiate(dir, R"(derivation {
  name = "fails"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo about to fail; exit 3" ];
})");
  const ServeBuildResult r = BuildOnRemote(dir, drv_path, drv);
  EXPECT_EQ(r.status, ServeBuildStatus::kPermanentFailure);
  EXPECT_TRUE(absl::StrContains(r.error_msg, "exit code 3")) << r.error_msg;
}

}  // namespace
}  // namespace kiln
