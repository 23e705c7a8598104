// Client tokens: made with `kiln-coordinator token` (on the admin socket of
// the running coordinator, and offline on its state), checked on every call
// of a real coordinator that requires them, scoped (read < submit < admin,
// push patterns), revocable; the CLI reads its token from KILN_TOKEN or a
// private file; refusals are counted; tokens never reach logs or metrics.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "common/digest.h"
#include "common/serve_protocol.h"
#include "tests/support/local_farm.h"
#include "tests/support/nar_builder.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::LocalFarm;

class TokenE2eTest : public ::testing::Test {
 protected:
  // `kiln-coordinator token ARGS --state-dir=…`.
  CommandResult Admin(const std::vector<std::string>& args) {
    ProcessSpec spec;
    spec.argv = {testing::BinPath("kiln-coordinator"), "token"};
    spec.argv.insert(spec.argv.end(), args.begin(), args.end());
    spec.argv.push_back("--state-dir=" + state_dir_);
    auto r = RunCommand(spec, "", absl::Minutes(1));
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : CommandResult{};
  }
  std::string Create(const std::string& name, const std::string& scopes) {
    CommandResult r = Admin({"create", "--name=" + name, "--scope=" + scopes});
    EXPECT_EQ(r.exit.exit_code, 0) << r.stderr_data;
    return std::string(absl::StripAsciiWhitespace(r.stdout_data));
  }
  // `kiln ARGS` with `env` (e.g. KILN_TOKEN=…).
  CommandResult Kiln(const LocalFarm& farm, const std::vector<std::string>& args, const std::vector<std::string>& env) {
    ProcessSpec spec = farm.KilnSpec(args);
    spec.extra_env.insert(spec.extra_env.end(), env.begin(), env.end());
    auto r = RunCommand(spec, "", absl::Minutes(3));
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : CommandResult{};
  }

  std::string state_dir_;
};

TEST_F(TokenE2eTest, EveryCallNeedsATokenWithTheRightScope) {
  LocalFarm farm(/*workers=*/0);
  farm.UsePrivateStores();  // Two workers, each its own machine.
  farm.SetCoordinatorFlags({"--require-tokens", "--push-allow=127.0.0.1:*/kiln/*", "--token-max-active-jobs=2"});
  ASSERT_TRUE(farm.Start().ok());
  state_dir_ = farm.dir().Sub("coordinator");

  // Workers need a token of scope `worker` too (no TLS here: anyone on the
  // host could otherwise register as any worker). One without is refused.
  ASSERT_TRUE(farm.AddWorker().ok());
  const std::string worker_token = Create("fr-par-1", "worker");
  const std::string token_file = farm.dir().Sub("worker-token");
  testing::WriteFileOrDie(token_file, worker_token + "\n");
  ASSERT_EQ(::chmod(token_file.c_str(), 0600), 0);
  farm.SetWorkerFlags({"--token-file=" + token_file});
  ASSERT_TRUE(farm.AddWorker().ok());

  // Made through the running coordinator's admin socket.
  const std::string ci = Create("ci-monorepo", "submit,push:127.0.0.1:*/kiln/*:testing");
  const std::string reader = Create("dashboard", "read");
  ASSERT_TRUE(absl::StartsWith(ci, "kiln_")) << ci;
  CommandResult dup = Admin({"create", "--name=ci-monorepo", "--scope=read"});
  EXPECT_EQ(dup.exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(dup.stderr_data, "exists")) << dup.stderr_data;
  CommandResult bad_scope = Admin({"create", "--name=x", "--scope=write"});
  EXPECT_EQ(bad_scope.exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(bad_scope.stderr_data, "unknown scope 'write'")) << bad_scope.stderr_data;

  const std::string flake = testing::SourcePath("examples/services/hello-api") + "#default";
  // No token: refused, with what to do.
  CommandResult none = Kiln(farm, {"build", flake}, {});
  EXPECT_NE(none.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(none.stderr_data, "requires a token: set KILN_TOKEN")) << none.stderr_data;
  // A read-only token cannot submit, but can list.
  CommandResult read_only = Kiln(farm, {"build", flake}, {"KILN_TOKEN=" + reader});
  EXPECT_NE(read_only.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(read_only.stderr_data, "token 'dashboard' has no submit scope"))
      << read_only.stderr_data;
  CommandResult workers = Kiln(farm, {"workers", "--json"}, {"KILN_TOKEN=" + reader});
  EXPECT_EQ(workers.exit.exit_code, 0) << workers.stderr_data;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(30);
       !absl::StrContains(workers.stdout_data, "\"worker-2\"") && absl::Now() < give_up;) {
    absl::SleepFor(absl::Milliseconds(100));
    workers = Kiln(farm, {"workers", "--json"}, {"KILN_TOKEN=" + reader});
  }
  EXPECT_TRUE(absl::StrContains(workers.stdout_data, "\"worker-2\"")) << workers.stdout_data;
  EXPECT_FALSE(absl::StrContains(workers.stdout_data, "\"worker-1\"")) << workers.stdout_data;
  EXPECT_TRUE(absl::StrContains(testing::ReadFileOrDie(farm.LogOf("worker-1")),
                                "this coordinator requires a token from workers"));
  // A worker token is for workers only.
  CommandResult as_client = Kiln(farm, {"build", flake}, {"KILN_TOKEN=" + worker_token});
  EXPECT_NE(as_client.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(as_client.stderr_data, "has no submit scope")) << as_client.stderr_data;

  // The CI token builds, and may push :testing but not :production.
  CommandResult built = Kiln(farm, {"build", flake, "--json"}, {"KILN_TOKEN=" + ci});
  ASSERT_EQ(built.exit.exit_code, 0) << built.stderr_data;
  CommandResult production =
      Kiln(farm, {"build", flake, "--push=127.0.0.1:5999/kiln/svc:production"}, {"KILN_TOKEN=" + ci});
  EXPECT_NE(production.exit.exit_code, 0);
  EXPECT_TRUE(
      absl::StrContains(production.stderr_data,
                        "PERMISSION_DENIED: token 'ci-monorepo' may not push to 127.0.0.1:5999/kiln/svc:production"))
      << production.stderr_data;
  // Nor, through '..', another repository: the CLI refuses it before
  // building, naming the rule (the coordinator and the worker would too).
  CommandResult escaped =
      Kiln(farm, {"build", flake, "--push=127.0.0.1:5999/kiln/../prod/svc:testing"}, {"KILN_TOKEN=" + ci});
  EXPECT_EQ(escaped.exit.exit_code, 2) << escaped.stderr_data;
  EXPECT_TRUE(absl::StrContains(escaped.stderr_data, "path component '..' is not allowed")) << escaped.stderr_data;
  // Input the CLI refuses before sending anything: a label key twice, an id
  // too long for a request's headers, control characters (not echoed).
  CommandResult twice = Kiln(farm, {"build", flake, "--label=pool=a,pool=b"}, {"KILN_TOKEN=" + ci});
  EXPECT_EQ(twice.exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(twice.stderr_data, "label 'pool' is given twice")) << twice.stderr_data;
  CommandResult long_id = Kiln(farm, {"status", std::string(9000, '7')}, {"KILN_TOKEN=" + ci});
  EXPECT_EQ(long_id.exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(long_id.stderr_data, "at most 128")) << long_id.stderr_data;
  CommandResult escape = Kiln(farm, {"status", "\x1b]0;owned\x07"}, {"KILN_TOKEN=" + ci});
  EXPECT_EQ(escape.exit.exit_code, 2);
  EXPECT_FALSE(absl::StrContains(escape.stderr_data, "\x1b")) << escape.stderr_data;
  // A token's quota of queued and running jobs.
  const std::string greeter = testing::SourcePath("examples/services/greeter") + "#default";
  const std::string image = testing::SourcePath("examples/services/hello-api") + "#oci-image";
  CommandResult over = Kiln(farm, {"build", flake, greeter, image, "--detach"}, {"KILN_TOKEN=" + ci});
  EXPECT_EQ(over.exit.exit_code, 2) << over.stderr_data;
  EXPECT_TRUE(absl::StrContains(over.stderr_data, "more would pass its quota of 2")) << over.stderr_data;

  // Draining a worker is an admin's.
  CommandResult drain = Kiln(farm, {"workers", "drain", "worker-1"}, {"KILN_TOKEN=" + ci});
  EXPECT_NE(drain.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(drain.stderr_data, "has no admin scope")) << drain.stderr_data;

  // From a private file instead of the environment; a file others may read
  // is refused before anything is sent.
  const std::string config = farm.dir().Sub("config");
  ASSERT_EQ(::mkdir(config.c_str(), 0700), 0);
  ASSERT_EQ(::mkdir((config + "/kiln").c_str(), 0700), 0);
  testing::WriteFileOrDie(config + "/kiln/token", reader + "\n");
  ASSERT_EQ(::chmod((config + "/kiln/token").c_str(), 0644), 0);
  CommandResult loose = Kiln(farm, {"workers"}, {"XDG_CONFIG_HOME=" + config});
  EXPECT_EQ(loose.exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(loose.stderr_data, "chmod 600")) << loose.stderr_data;
  ASSERT_EQ(::chmod((config + "/kiln/token").c_str(), 0600), 0);
  CommandResult from_file = Kiln(farm, {"workers"}, {"XDG_CONFIG_HOME=" + config});
  EXPECT_EQ(from_file.exit.exit_code, 0) << from_file.stderr_data;

  // Revoked: refused at once.
  CommandResult revoked = Admin({"revoke", "dashboard"});
  EXPECT_EQ(revoked.exit.exit_code, 0) << revoked.stderr_data;
  CommandResult after = Kiln(farm, {"workers"}, {"KILN_TOKEN=" + reader});
  EXPECT_NE(after.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(after.stderr_data, "UNAUTHENTICATED: the token is not valid")) << after.stderr_data;
  CommandResult listed = Admin({"list", "--json"});
  auto list = nlohmann::json::parse(listed.stdout_data);
  ASSERT_EQ(list.size(), 2u) << listed.stdout_data;  // The revoked one is gone.
  std::set<std::string> names;
  for (const auto& t : list) names.insert(t.value("name", ""));
  EXPECT_EQ(names, (std::set<std::string>{"ci-monorepo", "fr-par-1"}));

  // A `cache-read` token (a laptop's, a CI runner's) fetches from the farm
  // store what the workers sent it, and can do nothing else.
  const std::string cache_reader = Create("laptop-cache", "cache-read");
  CommandResult cache_build = Kiln(farm, {"build", flake}, {"KILN_TOKEN=" + cache_reader});
  EXPECT_NE(cache_build.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(cache_build.stderr_data, "has no submit scope")) << cache_build.stderr_data;
  const std::string out = nlohmann::json::parse(built.stdout_data)[0]["outputs"]["out"];
  const auto copy = [&](const std::string& store, const std::vector<std::string>& env) {
    ProcessSpec spec = testing::OnPrivateStore(farm.dir().Sub(store), farm.KilnSpec({"copy", out}).argv);
    spec.extra_env.insert(spec.extra_env.end(), env.begin(), env.end());
    absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  };
  CommandResult fetched = copy("laptop-nix", {"KILN_TOKEN=" + cache_reader});
  EXPECT_EQ(fetched.exit.exit_code, 0) << fetched.stderr_data;
  // The SSH gateway with that token in a file: `kiln serve-nix` answers a
  // Nix client's "which of these are valid" from the farm store.
  const std::string gateway_token = farm.dir().Sub("gateway-token");
  testing::WriteFileOrDie(gateway_token, cache_reader + "\n");
  ASSERT_EQ(::chmod(gateway_token.c_str(), 0600), 0);
  const std::string session = ServeWriter()
                                  .U64(kServeMagic1)
                                  .U64(kServeProtocolVersion)
                                  .U64(static_cast<uint64_t>(ServeCommand::kQueryValidPaths))
                                  .U64(0)
                                  .U64(0)
                                  .Strings({out})
                                  .data();
  absl::StatusOr<CommandResult> served =
      RunCommand(farm.KilnSpec({"serve-nix", "--token-file=" + gateway_token}), session, absl::Minutes(1));
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->exit.exit_code, 0) << served->stderr_data;
  const std::string expected = ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion).Strings({out}).data();
  EXPECT_EQ(served->stdout_data, expected) << served->stderr_data;
  // Adding paths through the gateway takes a `cache-write` token: with a
  // cache-read one the farm refuses, with a cache-write one it takes the
  // path (and checks it as any upload).
  const std::string nar = testing::NarArchive(testing::NarFile("added through the gateway\n"));
  const std::string add = ServeWriter()
                              .U64(kServeMagic1)
                              .U64(kServeProtocolVersion)
                              .U64(static_cast<uint64_t>(ServeCommand::kAddToStoreNar))
                              .String("/nix/store/cccccccccccccccccccccccccccccccc-gateway-added")
                              .String("")
                              .String(Sha256Hex(nar))
                              .Strings({})
                              .U64(0)
                              .U64(nar.size())
                              .U64(0)
                              .Strings({})
                              .String("")
                              .Raw(nar)
                              .data();
  absl::StatusOr<CommandResult> refused_add =
      RunCommand(farm.KilnSpec({"serve-nix", "--token-file=" + gateway_token}), add, absl::Minutes(1));
  ASSERT_TRUE(refused_add.ok());
  EXPECT_EQ(refused_add->exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(refused_add->stderr_data, "has no cache-write scope")) << refused_add->stderr_data;
  testing::WriteFileOrDie(gateway_token, Create("gateway", "cache-write") + "\n");
  absl::StatusOr<CommandResult> taken =
      RunCommand(farm.KilnSpec({"serve-nix", "--token-file=" + gateway_token}), add, absl::Minutes(1));
  ASSERT_TRUE(taken.ok());
  EXPECT_EQ(taken->exit.exit_code, 0) << taken->stderr_data;
  EXPECT_TRUE(absl::EndsWith(taken->stdout_data, ServeWriter().U64(1).data()));
  CommandResult anonymous = copy("other-nix", {});
  EXPECT_NE(anonymous.exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(anonymous.stderr_data, "requires a token")) << anonymous.stderr_data;

  // Refusals are counted by reason; no token appears in logs or metrics.
  auto metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(metrics.ok());
  EXPECT_TRUE(absl::StrContains(*metrics, "kiln_auth_refusals_total{reason=\"no_credentials\"}")) << *metrics;
  EXPECT_FALSE(absl::StrContains(*metrics, "kiln_auth_refusals_total{reason=\"scope\"} 0")) << *metrics;
  EXPECT_FALSE(absl::StrContains(*metrics, "kiln_auth_refusals_total{reason=\"bad_token\"} 0")) << *metrics;
  const std::string everything =
      *metrics + testing::ReadFileOrDie(farm.LogOf("coordinator")) + testing::ReadFileOrDie(farm.LogOf("worker-1")) +
      testing::ReadFileOrDie(farm.LogOf("worker-2")) + none.stderr_data + read_only.stderr_data +
      production.stderr_data + after.stderr_data + built.stdout_data + built.stderr_data + listed.stdout_data +
      fetched.stderr_data + cache_build.stderr_data;
  for (const std::string& token : {ci, reader, worker_token, cache_reader}) {
    // kiln_<16 hex digits of id>_<secret>: the secret is web-safe base64 and
    // may itself hold '_', so it is cut at its fixed offset, not at the last '_'
    // (that could leave a two-letter tail, found by chance in any log).
    ASSERT_TRUE(absl::StartsWith(token, "kiln_") && token.size() > 22 && token[21] == '_') << token;
    const std::string secret = token.substr(22);
    EXPECT_FALSE(absl::StrContains(everything, secret)) << "a token's secret leaked";
  }
}

TEST_F(TokenE2eTest, TokensMadeOfflineWorkOnceTheCoordinatorStarts) {
  testing::TempDir dir;
  state_dir_ = dir.Sub("state");
  const std::string admin = Create("ops", "admin");  // No coordinator yet: straight into its state.
  ASSERT_TRUE(absl::StartsWith(admin, "kiln_")) << admin;
  struct stat st {};
  ASSERT_EQ(::stat(state_dir_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 077, 0u) << "the state directory is the coordinator's alone";
  testing::WriteFileOrDie(dir.Sub("worker-token"), Create("worker-1", "worker"));
  ASSERT_EQ(::chmod(dir.Sub("worker-token").c_str(), 0600), 0);

  LocalFarm farm(/*workers=*/1);
  farm.SetCoordinatorFlags({"--require-tokens", "--state-dir=" + state_dir_});
  farm.SetWorkerFlags({"--token-file=" + dir.Sub("worker-token")});
  ASSERT_TRUE(farm.Start().ok());
  // Start() waits for the worker's process, not its registration: wait
  // (bounded) until the coordinator knows it.
  for (const absl::Time give_up = absl::Now() + absl::Seconds(30); absl::Now() < give_up;) {
    CommandResult listed = Kiln(farm, {"workers", "--json"}, {"KILN_TOKEN=" + admin});
    if (absl::StrContains(listed.stdout_data, "\"worker-1\"")) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  CommandResult drained = Kiln(farm, {"workers", "drain", "worker-1"}, {"KILN_TOKEN=" + admin});
  EXPECT_EQ(drained.exit.exit_code, 0) << drained.stderr_data;
  // The admin socket is private too.
  ASSERT_EQ(::stat((state_dir_ + "/admin.sock").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 077, 0u);
}

}  // namespace
}  // namespace kiln
