// Mutual TLS between workers and the coordinator, with certificates made by
// deploy/pki/kiln-pki: a real coordinator and worker over TLS on 127.0.0.1
// build with real Nix; workers without a certificate, with one from another
// CA or with an expired one are refused; a worker is known by its
// certificate's name; plaintext is refused off loopback.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "common/subprocess.h"
#include "common/tls.h"
#include "kiln/v1/workers.grpc.pb.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::LocalFarm;

void Pki(const std::vector<std::string>& args) {
  ProcessSpec spec;
  spec.argv = {testing::SourcePath("deploy/pki/kiln-pki")};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  auto r = RunCommand(spec, "", absl::Minutes(1));
  ASSERT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : std::string(r.status().message()));
}

TlsFiles WorkerFiles(const std::string& pki, const std::string& ca_pki, const std::string& name) {
  return {absl::StrCat(pki, "/workers/", name, ".crt"), absl::StrCat(pki, "/workers/", name, ".key"),
          ca_pki + "/ca.crt"};
}

// Opens a worker stream as `files` allow, registers as `claimed`, and
// returns how the coordinator ended the stream (or OK if it is still open
// after `hold`, during which `while_open` runs).
grpc::Status ConnectAs(const std::string& address, const TlsFiles& files, const std::string& claimed,
                       const std::function<void()>& while_open = nullptr) {
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = MakeChannelCredentials(files);
  if (!credentials.ok()) return grpc::Status(grpc::StatusCode::INTERNAL, std::string(credentials.status().message()));
  auto stub = kiln::v1::WorkerService::NewStub(MakeChannel(address, *credentials));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto stream = stub->Connect(&context);
  kiln::v1::WorkerMessage hello;
  hello.mutable_register_()->set_name(claimed);
  hello.mutable_register_()->add_systems("x86_64-linux");
  hello.mutable_register_()->set_max_jobs(1);
  stream->Write(hello);
  kiln::v1::CoordinatorMessage reply;
  if (stream->Read(&reply) && reply.has_registered()) {
    if (while_open) while_open();
    context.TryCancel();
    stream->Finish().IgnoreError();
    return grpc::Status::OK;
  }
  return stream->Finish();
}

TEST(TlsE2eTest, OnlyWorkersWithTheFarmsCertificatesTakeJobsAndTheyAreKnownByThem) {
  testing::TempDir dir;
  const std::string pki = dir.Sub("pki");
  const std::string rogue = dir.Sub("rogue");
  Pki({"init", pki});
  Pki({"coordinator", pki, "--ip", "127.0.0.1", "--dns", "localhost"});
  Pki({"worker", pki, "worker-1"});
  Pki({"worker", pki, "worker-2"});
  Pki({"worker", pki, "worker-old", "--days", "0"});  // Expires as it is made.
  Pki({"init", rogue});
  Pki({"worker", rogue, "worker-1"});  // The right name, the wrong CA.

  LocalFarm farm(/*workers=*/0);
  farm.SetCoordinatorFlags({"--tls-cert=" + pki + "/coordinator.crt", "--tls-key=" + pki + "/coordinator.key",
                            "--tls-ca=" + pki + "/ca.crt"});
  ASSERT_TRUE(farm.Start().ok());
  const TlsFiles w1 = WorkerFiles(pki, pki, "worker-1");
  farm.SetWorkerFlags({"--tls-cert=" + w1.cert, "--tls-key=" + w1.key, "--tls-ca=" + w1.ca});
  ASSERT_TRUE(farm.AddWorker().ok());

  // With TLS the coordinator requires tokens: one made on its admin socket.
  ProcessSpec create;
  create.argv = {testing::BinPath("kiln-coordinator"),          "token", "create", "--name=ci", "--scope=submit",
                 "--state-dir=" + farm.dir().Sub("coordinator")};
  auto token = RunCommand(create, "", absl::Minutes(1));
  ASSERT_TRUE(token.ok() && token->exit.Success()) << (token.ok() ? token->stderr_data : "");
  const std::string kiln_token = "KILN_TOKEN=" + std::string(absl::StripAsciiWhitespace(token->stdout_data));
  const auto kiln = [&](const std::vector<std::string>& args, absl::Duration timeout = absl::Minutes(3)) {
    ProcessSpec spec = farm.KilnSpec(args);
    spec.extra_env.push_back(kiln_token);
    return RunCommand(spec, "", timeout);
  };

  // A real build over mutual TLS; the CLI verifies the coordinator by the CA.
  const std::string ca_flag = "--tls-ca=" + pki + "/ca.crt";
  auto built = kiln({ca_flag, "build", testing::SourcePath("examples/services/hello-api") + "#oci-image", "--json"});
  ASSERT_TRUE(built.ok());
  ASSERT_EQ(built->exit.exit_code, 0) << built->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(built->stdout_data)[0].value("worker", ""), "worker-1");

  // Without a CA the CLI will not speak plaintext to a TLS coordinator.
  auto plain = kiln({"workers", "--json"}, absl::Seconds(30));
  ASSERT_TRUE(plain.ok());
  EXPECT_NE(plain->exit.exit_code, 0);

  const std::string address = farm.coordinator_address();
  // No certificate at all: the stream is refused with UNAUTHENTICATED.
  grpc::Status none = ConnectAs(address, {"", "", pki + "/ca.crt"}, "worker-9");
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAUTHENTICATED) << none.error_message();
  EXPECT_TRUE(absl::StrContains(none.error_message(), "certificate")) << none.error_message();
  // A certificate from another CA, and an expired one: no TLS session.
  grpc::Status foreign = ConnectAs(address, WorkerFiles(rogue, pki, "worker-1"), "worker-1");
  EXPECT_EQ(foreign.error_code(), grpc::StatusCode::UNAVAILABLE) << foreign.error_message();
  absl::SleepFor(absl::Seconds(1.1));
  grpc::Status expired = ConnectAs(address, WorkerFiles(pki, pki, "worker-old"), "worker-old");
  EXPECT_EQ(expired.error_code(), grpc::StatusCode::UNAVAILABLE) << expired.error_message();

  // worker-2's certificate claiming to be worker-1: registered as worker-2,
  // and the real worker-1 keeps its connection.
  nlohmann::json during;
  grpc::Status impostor = ConnectAs(address, WorkerFiles(pki, pki, "worker-2"), "worker-1", [&] {
    auto listed = kiln({ca_flag, "workers", "--json"});
    if (listed.ok() && listed->exit.exit_code == 0) during = nlohmann::json::parse(listed->stdout_data);
  });
  EXPECT_TRUE(impostor.ok()) << impostor.error_message();
  ASSERT_EQ(during.size(), 2u) << during.dump();
  EXPECT_EQ(during[0].value("name", ""), "worker-1");
  EXPECT_EQ(during[0].value("state", ""), "connected");
  EXPECT_EQ(during[1].value("name", ""), "worker-2");
  EXPECT_TRUE(absl::StrContains(testing::ReadFileOrDie(farm.LogOf("coordinator")),
                                "registering as 'worker-1' holds the certificate of 'worker-2'"));
}

// With TLS the binary cache (on loopback, behind a proxy for other hosts)
// wants a token: a stock Nix client with a cache-read token in its netrc
// file substitutes what a worker built over mutual TLS; without one, or
// with a forged one, it cannot.
TEST(TlsE2eTest, TheBinaryCacheWantsACacheReadTokenAsNixSendsIt) {
  testing::TempDir dir;
  const std::string pki = dir.Sub("pki");
  Pki({"init", pki});
  Pki({"coordinator", pki, "--ip", "127.0.0.1", "--dns", "localhost"});
  Pki({"worker", pki, "worker-1"});
  LocalFarm farm(/*workers=*/0);
  farm.UsePrivateStores();
  farm.SetCoordinatorFlags({"--tls-cert=" + pki + "/coordinator.crt", "--tls-key=" + pki + "/coordinator.key",
                            "--tls-ca=" + pki + "/ca.crt", "--cache-listen=127.0.0.1:0"});
  ASSERT_TRUE(farm.Start().ok());
  const TlsFiles w1 = WorkerFiles(pki, pki, "worker-1");
  farm.SetWorkerFlags({"--tls-cert=" + w1.cert, "--tls-key=" + w1.key, "--tls-ca=" + w1.ca});
  ASSERT_TRUE(farm.AddWorker().ok());
  const auto token = [&](const std::string& name, const std::string& scope) {
    ProcessSpec create;
    create.argv = {
        testing::BinPath("kiln-coordinator"),          "token", "create", "--name=" + name, "--scope=" + scope,
        "--state-dir=" + farm.dir().Sub("coordinator")};
    auto made = RunCommand(create, "", absl::Minutes(1));
    EXPECT_TRUE(made.ok() && made->exit.Success()) << (made.ok() ? made->stderr_data : "");
    return made.ok() ? std::string(absl::StripAsciiWhitespace(made->stdout_data)) : std::string();
  };
  const std::string ci = token("ci", "submit"), laptop = token("laptop", "cache-read");
  testing::WriteFileOrDie(dir.Sub("svc/flake.nix"), absl::StrCat(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "tls-cache-)",
                                                                 absl::ToUnixNanos(absl::Now()),
                                                                 R"("; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo over https > $out" ];
    };
  };
})"));
  ProcessSpec build = farm.KilnSpec({"--tls-ca=" + pki + "/ca.crt", "build", dir.Sub("svc"), "--json"});
  build.extra_env.push_back("KILN_TOKEN=" + ci);
  auto built = RunCommand(build, "", absl::Minutes(3));
  ASSERT_TRUE(built.ok());
  ASSERT_EQ(built->exit.exit_code, 0) << built->stderr_data;
  const std::string out = nlohmann::json::parse(built->stdout_data)[0]["outputs"]["out"];

  const std::string url = "http://" + farm.cache_address();
  const auto curl = [&](const std::vector<std::string>& args) {
    ProcessSpec spec;
    spec.argv = {"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"};
    spec.argv.insert(spec.argv.end(), args.begin(), args.end());
    auto r = RunCommand(spec, "", absl::Seconds(30));
    return r.ok() ? r->stdout_data : std::string("curl did not run");
  };
  EXPECT_EQ(curl({url + "/nix-cache-info"}), "401");
  EXPECT_EQ(curl({"-u", "anyone:" + laptop, url + "/nix-cache-info"}), "200");
  EXPECT_EQ(curl({"-u", "anyone:" + ci, url + "/nix-cache-info"}), "200");  // Any client scope reads.
  EXPECT_EQ(curl({"-u", "anyone:kiln_0000000000000000_forged", url + "/nix-cache-info"}), "401");

  // A stock Nix on a store of its own, the token in its netrc file.
  ProcessSpec key;
  key.argv = {testing::BinPath("kiln-coordinator"), "cache", "public-key",
              "--state-dir=" + farm.dir().Sub("coordinator")};
  auto public_key = RunCommand(key, "", absl::Minutes(1));
  ASSERT_TRUE(public_key.ok() && public_key->exit.Success());
  testing::WriteFileOrDie(dir.Sub("netrc"), "machine 127.0.0.1 login laptop password " + laptop + "\n");
  const auto substitute = [&](const std::string& store, bool with_netrc) {
    std::vector<std::string> argv = {
        "nix-store", "--realise",           out,
        "--option",  "substituters",        url,
        "--option",  "trusted-public-keys", std::string(absl::StripAsciiWhitespace(public_key->stdout_data))};
    if (with_netrc) argv.insert(argv.end(), {"--option", "netrc-file", dir.Sub("netrc")});
    ProcessSpec spec = testing::OnPrivateStore(dir.Sub(store), argv);
    auto r = RunCommand(spec, "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  };
  CommandResult refused = substitute("anonymous-nix", false);
  EXPECT_FALSE(refused.exit.Success()) << refused.stdout_data;
  CommandResult fetched = substitute("laptop-nix", true);
  EXPECT_TRUE(fetched.exit.Success()) << fetched.stderr_data;
  EXPECT_EQ(absl::StripAsciiWhitespace(fetched.stdout_data), out);
  // The token is in no log.
  const std::string secret = laptop.substr(22);
  EXPECT_FALSE(absl::StrContains(testing::ReadFileOrDie(farm.LogOf("coordinator")), secret));
}

TEST(TlsE2eTest, PlaintextIsRefusedOffLoopbackBeforeAnythingListensOrDials) {
  testing::TempDir dir;
  ProcessSpec coordinator;
  coordinator.argv = {testing::BinPath("kiln-coordinator"), "--listen=192.0.2.1:0", "--metrics-listen=127.0.0.1:0",
                      "--state-dir=" + dir.Sub("state")};
  auto c = RunCommand(coordinator, "", absl::Seconds(30));
  ASSERT_TRUE(c.ok());
  EXPECT_NE(c->exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(c->stderr_data, "will not use plaintext gRPC on 192.0.2.1:0")) << c->stderr_data;

  ProcessSpec worker;
  worker.argv = {testing::BinPath("kiln-worker"),
                 "--coordinator=192.0.2.1:7600",
                 "--work-dir=" + dir.Sub("work"),
                 "--systems=x86_64-linux",
                 "--features=none",
                 "--metrics-listen=127.0.0.1:0"};
  auto w = RunCommand(worker, "", absl::Seconds(30));
  ASSERT_TRUE(w.ok());
  EXPECT_NE(w->exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(w->stderr_data, "will not use plaintext gRPC on 192.0.2.1:7600")) << w->stderr_data;
  // A flag of the wrong shape is refused as early.
  worker.argv.push_back("--push-gzip-level=12");
  auto bad = RunCommand(worker, "", absl::Seconds(30));
  ASSERT_TRUE(bad.ok());
  EXPECT_NE(bad->exit.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(bad->stderr_data, "--push-gzip-level: gzip level \"12\"")) << bad->stderr_data;

  ProcessSpec cli;
  cli.argv = {testing::BinPath("kiln"), "--coordinator=192.0.2.1:7600", "workers"};
  auto k = RunCommand(cli, "", absl::Seconds(30));
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->exit.exit_code, 2);
  EXPECT_TRUE(absl::StrContains(k->stderr_data, "will not use plaintext gRPC")) << k->stderr_data;
}

}  // namespace
}  // namespace kiln
