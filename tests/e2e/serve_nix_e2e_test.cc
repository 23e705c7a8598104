// `kiln serve-nix` behind a real sshd as a forced command, and stock Nix on
// a store of its own as the client (ssh://root@127.0.0.1): what the farm
// built is valid there, its path infos carry the farm's signatures, and
// `nix copy --from` fetches a closure (Nix checks every NAR hash and
// signature); paths a client adds go into the farm store; and `nix-build`
// with the gateway as its remote builder builds every derivation on the farm.
#include <signal.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <fstream>
#include <regex>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/serve_protocol.h"
#include "common/subprocess.h"
#include "tests/support/local_farm.h"
#include "tests/support/local_sshd.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

class ServeNixE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Three machines, each with a store of its own (and no build users); a
    // killed worker's jobs go elsewhere after a short lease.
    farm_.UsePrivateStores();
    farm_.SetCoordinatorFlags({"--lease=2s"});
    ASSERT_TRUE(farm_.Start().ok());
    testing::WriteFileOrDie(work_.Sub("svc/flake.nix"), R"({
  outputs = { self }: rec {
    packages.x86_64-linux.base = derivation {
      name = "base"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo served-over-ssh > $out" ];
    };
    packages.x86_64-linux.default = derivation {
      name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
      base = packages.x86_64-linux.base;
      args = [ "-c" "read line < $base; { echo $line top; echo $base; } > $out" ];
    };
  };
})");
    absl::StatusOr<CommandResult> built = farm_.Kiln({"build", "--json", work_.Sub("svc")});
    ASSERT_TRUE(built.ok()) << built.status();
    ASSERT_EQ(built->exit.exit_code, 0) << built->stderr_data;
    top_ = nlohmann::json::parse(built->stdout_data)[0]["outputs"]["out"].get<std::string>();
    absl::StatusOr<CommandResult> key =
        RunCommand({.argv = {testing::BinPath("kiln-coordinator"), "cache", "public-key",
                             "--state-dir=" + farm_.dir().Sub("coordinator")},
                    .extra_env = {},
                    .cwd = ""});
    ASSERT_TRUE(key.ok() && key->exit.Success());
    public_key_ = std::string(absl::StripAsciiWhitespace(key->stdout_data));
    absl::StatusOr<std::unique_ptr<testing::LocalSshd>> sshd = testing::LocalSshd::Start(
        absl::StrCat(testing::BinPath("kiln"), " serve-nix --coordinator=", farm_.coordinator_address()));
    ASSERT_TRUE(sshd.ok()) << sshd.status();
    sshd_ = *std::move(sshd);
  }

  // `argv` on a laptop with a store of its own, reaching the gateway.
  CommandResult OnLaptop(const std::string& store, std::vector<std::string> argv) {
    ProcessSpec spec = testing::OnPrivateStore(work_.Sub(store), argv);
    spec.extra_env.push_back("NIX_SSHOPTS=" + sshd_->NixSshOpts());
    absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  }

  // `nix-build -j0 FILE` with the gateway as its builder, on a laptop's
  // store, running in the background.
  Spawned StartBuild(const std::string& store, const std::string& file) {
    ProcessSpec spec = testing::OnPrivateStore(
        work_.Sub(store),
        {"nix-build", "--no-out-link", "-j0", "--option", "builders", sshd_->StoreUri() + " x86_64-linux - 4 1", file});
    spec.extra_env.push_back("NIX_SSHOPTS=" + sshd_->NixSshOpts());
    absl::StatusOr<Spawned> client = SpawnWithPipes(spec, /*want_stdin=*/false, /*stderr_to_null=*/true);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *client : Spawned{};
  }
  // Waits (two minutes at most) for it; its exit code, -1 if it did not
  // exit.
  static int WaitBuild(const Spawned& client) {
    int wstatus = 0;
    for (int i = 0; i < 1200 && ::waitpid(client.pid, &wstatus, WNOHANG) == 0; ++i) {
      absl::SleepFor(absl::Milliseconds(100));
    }
    ::close(client.stdout_fd);
    return WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
  }
  // The first line of FILE's output, already in the laptop's store.
  std::string FirstLineOfOutput(const std::string& store, const std::string& file) {
    CommandResult line = OnLaptop(
        store,
        {"/bin/sh", "-c", "read l < $(nix-build --no-out-link -j0 --option builders '' " + file + ") && echo $l"});
    return std::string(absl::StripAsciiWhitespace(line.stdout_data));
  }

  // Buildsets in the farm's history whose installable names `drv_name`.
  int BuildsetsFor(const std::string& drv_name) {
    absl::StatusOr<CommandResult> h = farm_.Kiln({"history", "--json", "--limit=100"});
    EXPECT_TRUE(h.ok() && h->exit.Success());
    if (!h.ok() || !h->exit.Success()) return -1;
    int n = 0;
    for (const nlohmann::json& b : nlohmann::json::parse(h->stdout_data)) {
      for (const nlohmann::json& i : b["installables"]) n += absl::StrContains(i.get<std::string>(), drv_name);
    }
    return n;
  }
  // A session sent raw over ssh to the gateway: `bytes` in, the first
  // `reply_bytes` bytes of its answer out (stdin stays open until then: a
  // hang-up would cancel the work).
  std::string RawSession(const std::string& bytes, size_t reply_bytes) {
    std::vector<std::string> argv = {"ssh"};
    for (absl::string_view o : absl::StrSplit(sshd_->NixSshOpts(), ' ', absl::SkipEmpty())) argv.emplace_back(o);
    argv.push_back("root@127.0.0.1");
    absl::StatusOr<Spawned> ssh = SpawnWithPipes({.argv = argv, .extra_env = {}, .cwd = ""}, /*want_stdin=*/true,
                                                 /*stderr_to_null=*/true);
    EXPECT_TRUE(ssh.ok()) << ssh.status();
    if (!ssh.ok()) return "";
    std::string reply;
    bool written = true;
    for (size_t at = 0; written && at < bytes.size();) {
      const ssize_t n = ::write(ssh->stdin_fd, bytes.data() + at, bytes.size() - at);
      written = n > 0;
      at += written ? static_cast<size_t>(n) : 0;
    }
    if (written) {
      char buf[256];
      while (reply.size() < reply_bytes) {
        pollfd p{ssh->stdout_fd, POLLIN, 0};
        if (::poll(&p, 1, 120000) <= 0) break;
        const ssize_t n = ::read(ssh->stdout_fd, buf, std::min(sizeof(buf), reply_bytes - reply.size()));
        if (n <= 0) break;
        reply.append(buf, static_cast<size_t>(n));
      }
    }
    ::close(ssh->stdin_fd);
    ::close(ssh->stdout_fd);
    int wstatus = 0;
    ::waitpid(ssh->pid, &wstatus, 0);
    return reply;
  }

  CommandResult BuildOnFarm(const std::string& store, const std::string& file) {
    return OnLaptop(store, {"nix-build", "--no-out-link", "-j0", "--option", "builders",
                            sshd_->StoreUri() + " x86_64-linux - 4 1", file});
  }

  testing::LocalFarm farm_{/*workers=*/3};
  testing::TempDir work_;
  std::string top_, public_key_;
  std::unique_ptr<testing::LocalSshd> sshd_;
};

TEST_F(ServeNixE2eTest, StockNixReadsTheFarmStoreThroughTheGateway) {
  // The closure, with hashes and the farm's signatures, as the gateway says.
  CommandResult infos = OnLaptop(
      "probe-nix", {"nix", "path-info", "--json", "--recursive", "--sigs", "--store", sshd_->StoreUri(), top_});
  ASSERT_TRUE(infos.exit.Success()) << infos.stderr_data << sshd_->LogText();
  const nlohmann::json closure = nlohmann::json::parse(infos.stdout_data);
  ASSERT_EQ(closure.size(), 2u) << infos.stdout_data;
  for (const nlohmann::json& p : closure) {
    EXPECT_TRUE(absl::StartsWith(p["narHash"].get<std::string>(), "sha256")) << p.dump();
    ASSERT_TRUE(p.contains("signatures")) << p.dump();
    EXPECT_TRUE(absl::StartsWith(p["signatures"][0].get<std::string>(), "kiln-farm-1:")) << p.dump();
  }

  // nix copy --from the gateway into an empty store, signatures checked.
  CommandResult copied = OnLaptop(
      "laptop-nix", {"nix", "copy", "--from", sshd_->StoreUri(), "--option", "trusted-public-keys", public_key_, top_});
  ASSERT_TRUE(copied.exit.Success()) << copied.stderr_data;
  CommandResult verified = OnLaptop("laptop-nix", {"nix-store", "--verify-path", top_});
  EXPECT_TRUE(verified.exit.Success()) << verified.stderr_data;
  CommandResult sigs = OnLaptop("laptop-nix", {"nix", "path-info", "--sigs", top_});
  EXPECT_TRUE(absl::StrContains(sigs.stdout_data, "kiln-farm-1:")) << sigs.stdout_data;
  std::ifstream top_file(work_.Sub("laptop-nix/store/") + std::filesystem::path(top_).filename().string());
  std::string line;
  std::getline(top_file, line);
  EXPECT_EQ(line, "served-over-ssh top");

  // Without the farm's key trusted, Nix refuses what the gateway serves.
  CommandResult distrusted = OnLaptop(
      "distrusting-nix", {"nix", "copy", "--from", sshd_->StoreUri(), "--option", "trusted-public-keys", "", top_});
  EXPECT_FALSE(distrusted.exit.Success());
  EXPECT_TRUE(absl::StrContains(distrusted.stderr_data, "signature")) << distrusted.stderr_data;
}

TEST_F(ServeNixE2eTest, StockNixAddsItsPathsToTheFarmStoreThroughTheGateway) {
  // A laptop's own build: an output referring to a source it added.
  testing::WriteFileOrDie(work_.Sub("local/local.txt"), "a laptop's source\n");
  testing::WriteFileOrDie(work_.Sub("local/default.nix"), R"(derivation {
  name = "laptop-built"; system = "x86_64-linux"; builder = "/bin/sh";
  src = ./local.txt;
  args = [ "-c" "{ cat $src; echo $src; } > $out" ];
})");
  CommandResult built = OnLaptop("uploader-nix", {"nix-build", "--no-out-link", work_.Sub("local/default.nix")});
  ASSERT_TRUE(built.exit.Success()) << built.stderr_data;
  const std::string local(absl::StripAsciiWhitespace(built.stdout_data));
  CommandResult sent = OnLaptop("uploader-nix", {"nix", "copy", "--to", sshd_->StoreUri(), local});
  ASSERT_TRUE(sent.exit.Success()) << sent.stderr_data << sshd_->LogText();
  // Now the farm's: valid through the gateway, and fetched by another
  // machine with `kiln copy`, closure and farm signature included.
  CommandResult valid = OnLaptop("probe-nix", {"nix", "path-info", "--recursive", "--store", sshd_->StoreUri(), local});
  ASSERT_TRUE(valid.exit.Success()) << valid.stderr_data;
  EXPECT_EQ(std::count(valid.stdout_data.begin(), valid.stdout_data.end(), '\n'), 2) << valid.stdout_data;
  ProcessSpec copy = testing::OnPrivateStore(work_.Sub("ci-nix"), farm_.KilnSpec({"copy", "--json", local}).argv);
  absl::StatusOr<CommandResult> copied = RunCommand(copy, "", absl::Minutes(2));
  ASSERT_TRUE(copied.ok()) << copied.status();
  ASSERT_EQ(copied->exit.exit_code, 0) << copied->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(copied->stdout_data)["fetched"], 2);
  // Sent again: the gateway says the farm has it, nothing travels.
  CommandResult again = OnLaptop("uploader-nix", {"nix", "copy", "-v", "--to", sshd_->StoreUri(), local});
  ASSERT_TRUE(again.exit.Success()) << again.stderr_data;
  EXPECT_FALSE(absl::StrContains(again.stderr_data, "copying path")) << again.stderr_data;
}

// Nix's remote building with the gateway as the builder: nothing builds on
// the laptop (-j0); every derivation is a farm job, its inputs sent to or
// substituted from the farm store, its outputs fetched back.
TEST_F(ServeNixE2eTest, NixBuildOffloadsEveryDerivationToTheFarm) {
  const std::string runs = work_.Sub("runs");
  testing::WriteFileOrDie(
      work_.Sub("graph/default.nix"),
      absl::StrCat(R"(let
  step = name: deps: derivation {
    inherit name; system = "x86_64-linux"; builder = "/bin/sh";
    inherit deps;
    args = [ "-c" "echo ${name} >> )",
                   runs, R"(; { echo ${name}; for d in $deps; do read line < $d; echo $line; done; } > $out" ];
  };
  base = step "base" [ ];
  left = step "left" [ base ];
  right = step "right" [ base ];
in step "top" [ left right ])"));
  CommandResult built =
      OnLaptop("builder-nix", {"nix-build", "--no-out-link", "-j0", "--option", "builders",
                               sshd_->StoreUri() + " x86_64-linux - 4 1", work_.Sub("graph/default.nix")});
  ASSERT_TRUE(built.exit.Success()) << built.stderr_data << sshd_->LogText();
  const std::string top(absl::StripAsciiWhitespace(built.stdout_data));
  std::ifstream top_file(work_.Sub("builder-nix/store/") + std::filesystem::path(top).filename().string());
  std::vector<std::string> lines;
  for (std::string line; std::getline(top_file, line);) lines.push_back(line);
  EXPECT_EQ(lines, (std::vector<std::string>{"top", "left", "right"}));
  // Each derivation ran once, on the farm (the laptop builds nothing with
  // -j0), and the build log came back through the gateway.
  EXPECT_EQ(testing::ReadFileOrDie(runs).size(), std::string("base\nleft\nright\ntop\n").size())
      << testing::ReadFileOrDie(runs);
  EXPECT_TRUE(absl::StrContains(built.stderr_data, "kiln: building")) << built.stderr_data;
  // The farm recorded them as jobs.
  absl::StatusOr<CommandResult> history = farm_.Kiln({"history", "--json"});
  ASSERT_TRUE(history.ok());
  EXPECT_TRUE(absl::StrContains(history->stdout_data, "-top.drv")) << history->stdout_data;

  // A second laptop with an empty store: everything comes from the farm,
  // nothing is built again — not even a job: the gateway finds the outputs
  // in the farm store.
  const size_t buildsets_before = nlohmann::json::parse(history->stdout_data).size();
  CommandResult again = OnLaptop("second-nix", {"nix-build", "--no-out-link", "-j0", "--option", "builders",
                                                sshd_->StoreUri() + " x86_64-linux - 4 1", "--option", "substituters",
                                                "", work_.Sub("graph/default.nix")});
  ASSERT_TRUE(again.exit.Success()) << again.stderr_data;
  EXPECT_EQ(absl::StripAsciiWhitespace(again.stdout_data), top);
  EXPECT_EQ(testing::ReadFileOrDie(runs).size(), std::string("base\nleft\nright\ntop\n").size())
      << "built again: " << testing::ReadFileOrDie(runs);
  absl::StatusOr<CommandResult> history_after = farm_.Kiln({"history", "--json"});
  ASSERT_TRUE(history_after.ok());
  EXPECT_EQ(nlohmann::json::parse(history_after->stdout_data).size(), buildsets_before);
  EXPECT_TRUE(absl::StrContains(again.stderr_data, "the farm store has the outputs")) << again.stderr_data;

  // A failing derivation: Nix's message reaches the client.
  testing::WriteFileOrDie(work_.Sub("fails/default.nix"), R"(derivation {
  name = "fails-on-the-farm"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo about to fail; exit 7" ];
})");
  CommandResult failed =
      OnLaptop("builder-nix", {"nix-build", "--no-out-link", "-j0", "--option", "builders",
                               sshd_->StoreUri() + " x86_64-linux - 4 1", work_.Sub("fails/default.nix")});
  EXPECT_FALSE(failed.exit.Success());
  EXPECT_TRUE(absl::StrContains(failed.stderr_data, "exit code 7")) << failed.stderr_data;
}

// Ctrl-C on the laptop (its nix-build and ssh killed): the gateway sees
// the session's stdin close and cancels the farm job it started.
// A wider graph — 20 derivations in three levels with fan-in — spreads over
// the workers, and the result is what a local build gives.
TEST_F(ServeNixE2eTest, AGraphOfTwentyDerivationsSpreadsOverTheWorkers) {
  testing::WriteFileOrDie(work_.Sub("wide/default.nix"), R"(let
  step = name: deps: derivation {
    inherit name deps; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "{ echo ${name}; for d in $deps; do read line < $d; echo $line; done; } > $out" ];
  };
  leaves = map (i: step "leaf-${toString i}" [ ]) [ 1 2 3 4 5 6 ];
  pick = l: i: builtins.elemAt l (i - (i / builtins.length l) * builtins.length l);
  middle = map (i: step "mid-${toString i}" [ (pick leaves i) (pick leaves (i + 1)) (pick leaves (i + 3)) ])
    [ 0 1 2 3 4 5 6 7 ];
  upper = map (i: step "up-${toString i}" [ (pick middle i) (pick middle (i + 4)) ]) [ 0 1 2 3 4 ];
in step "wide-top" upper)");
  const std::vector<std::string> build = {"nix-build",
                                          "--no-out-link",
                                          "-j0",
                                          "--option",
                                          "builders",
                                          sshd_->StoreUri() + " x86_64-linux - 4 1",
                                          work_.Sub("wide/default.nix")};
  CommandResult remote = OnLaptop("wide-nix", build);
  ASSERT_TRUE(remote.exit.Success()) << remote.stderr_data;
  // The same graph built locally, in a store of its own: the same output.
  std::vector<std::string> local = build;
  local[2] = "-j4";
  local[5] = "";
  CommandResult here = OnLaptop("local-nix", local);
  ASSERT_TRUE(here.exit.Success()) << here.stderr_data;
  EXPECT_EQ(remote.stdout_data, here.stdout_data);
  EXPECT_EQ(testing::ReadFileOrDie(work_.Sub("wide-nix/store/") +
                                   std::string(absl::StripAsciiWhitespace(remote.stdout_data)).substr(11)),
            testing::ReadFileOrDie(work_.Sub("local-nix/store/") +
                                   std::string(absl::StripAsciiWhitespace(here.stdout_data)).substr(11)));
  // Twenty jobs, on more than one worker.
  absl::StatusOr<CommandResult> h = farm_.Kiln({"history", "--json", "--limit=100"});
  ASSERT_TRUE(h.ok() && h->exit.Success());
  std::set<std::string> workers;
  int jobs = 0;
  for (const nlohmann::json& b : nlohmann::json::parse(h->stdout_data)) {
    const std::string installable = b["installables"].empty() ? "" : b["installables"][0].get<std::string>();
    if (!absl::StrContains(installable, "-leaf-") && !absl::StrContains(installable, "-mid-") &&
        !absl::StrContains(installable, "-up-") && !absl::StrContains(installable, "-wide-top")) {
      continue;
    }
    ++jobs;
    absl::StatusOr<CommandResult> st = farm_.Kiln({"status", "--json", b["buildsetId"].get<std::string>()});
    ASSERT_TRUE(st.ok() && st->exit.Success());
    workers.insert(nlohmann::json::parse(st->stdout_data)["jobs"][0].value("worker", ""));
  }
  EXPECT_EQ(jobs, 20);
  EXPECT_GE(workers.size(), 2u) << "all on one worker";
}

TEST_F(ServeNixE2eTest, AClientThatHangsUpHasItsFarmJobCancelled) {
  testing::WriteFileOrDie(work_.Sub("slow/default.nix"), R"(derivation {
  name = "sleeper"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo sleeping; /bin/sleep 120; echo done > $out" ];
})");
  const Spawned client = StartBuild("impatient-nix", work_.Sub("slow/default.nix"));
  ASSERT_GT(client.pid, 0);
  // The sleeper's buildset, as `kiln history` shows it.
  const auto sleeper = [&]() -> nlohmann::json {
    absl::StatusOr<CommandResult> h = farm_.Kiln({"history", "--json"});
    if (!h.ok() || !h->exit.Success()) return nullptr;
    for (const nlohmann::json& b : nlohmann::json::parse(h->stdout_data)) {
      for (const nlohmann::json& i : b["installables"]) {
        if (absl::StrContains(i.get<std::string>(), "-sleeper.drv")) return b;
      }
    }
    return nullptr;
  };
  nlohmann::json b;
  for (int i = 0; i < 300 && (b = sleeper()).is_null(); ++i) absl::SleepFor(absl::Milliseconds(100));
  ASSERT_FALSE(b.is_null()) << "the job never reached the farm";
  EXPECT_EQ(b["unfinished"], 1) << b.dump();
  absl::SleepFor(absl::Seconds(1));  // Running on a worker by now.
  ::kill(-client.pid, SIGKILL);      // The laptop's nix-build and ssh, at once.
  WaitBuild(client);
  for (int i = 0; i < 200 && (b = sleeper())["cancelled"] != 1; ++i) absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(b["cancelled"], 1) << "the farm job outlived its client: " << b.dump();
}

// The client's limits hold: a build silent for longer than its
// max-silent-time fails, with Nix's reason.
TEST_F(ServeNixE2eTest, TheClientsMaxSilentTimeHolds) {
  testing::WriteFileOrDie(work_.Sub("silent/default.nix"), R"(derivation {
  name = "silent"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "/bin/sleep 30; echo late > $out" ];
})");
  const absl::Time start = absl::Now();
  CommandResult r =
      OnLaptop("silent-nix", {"nix-build", "--no-out-link", "-j0", "--option", "max-silent-time", "2", "--option",
                              "builders", sshd_->StoreUri() + " x86_64-linux - 4 1", work_.Sub("silent/default.nix")});
  EXPECT_FALSE(r.exit.Success());
  EXPECT_TRUE(absl::StrContains(r.stderr_data, "silence")) << r.stderr_data;
  EXPECT_LT(absl::Now() - start, absl::Seconds(25)) << "the build was not stopped";
}

// A worker killed mid-derivation: the job runs again on another worker and
// the client gets one result, the right one.
TEST_F(ServeNixE2eTest, AWorkerKilledMidDerivationIsRetriedElsewhere) {
  const std::string marker = absl::StrCat("once-", absl::ToUnixNanos(absl::Now()));
  testing::WriteFileOrDie(work_.Sub("slow/default.nix"), absl::StrCat(R"(derivation {
  name = "slow-on-a-worker"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo started; /bin/sleep 4; echo )",
                                                                      marker, R"( > $out" ];
})"));
  const Spawned client = StartBuild("patient-nix", work_.Sub("slow/default.nix"));
  ASSERT_GT(client.pid, 0);
  // Which worker runs it.
  std::string worker;
  for (int i = 0; i < 300 && worker.empty(); ++i) {
    absl::StatusOr<CommandResult> h = farm_.Kiln({"history", "--json"});
    if (h.ok() && h->exit.Success()) {
      for (const nlohmann::json& b : nlohmann::json::parse(h->stdout_data)) {
        if (!absl::StrContains(b.dump(), "-slow-on-a-worker.drv")) continue;
        absl::StatusOr<CommandResult> st = farm_.Kiln({"status", "--json", b["buildsetId"].get<std::string>()});
        if (!st.ok() || !st->exit.Success()) continue;
        const nlohmann::json status = nlohmann::json::parse(st->stdout_data);
        const nlohmann::json& job = status["jobs"][0];
        if (job.value("status", "") == "running") worker = job.value("worker", "");
      }
    }
    if (worker.empty()) absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_FALSE(worker.empty()) << "the job never ran";
  farm_.KillWorker(std::stoul(worker.substr(worker.rfind('-') + 1)) - 1, SIGKILL);
  EXPECT_EQ(WaitBuild(client), 0);
  EXPECT_EQ(FirstLineOfOutput("patient-nix", work_.Sub("slow/default.nix")), marker);
}

// The coordinator killed (-9) and started again mid-derivation: the job
// survives as any job does, the gateway's watch resumes, and the client
// gets its result.
TEST_F(ServeNixE2eTest, TheCoordinatorRestartingMidDerivationIsSurvived) {
  const std::string marker = absl::StrCat("survived-", absl::ToUnixNanos(absl::Now()));
  testing::WriteFileOrDie(work_.Sub("restart/default.nix"), absl::StrCat(R"(derivation {
  name = "outlives-a-coordinator"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo started; /bin/sleep 3; echo )",
                                                                         marker, R"( > $out" ];
})"));
  const Spawned client = StartBuild("restart-nix", work_.Sub("restart/default.nix"));
  ASSERT_GT(client.pid, 0);
  bool running = false;
  for (int i = 0; i < 300 && !running; ++i) {
    absl::StatusOr<CommandResult> h = farm_.Kiln({"history", "--json"});
    running = h.ok() && absl::StrContains(h->stdout_data, "-outlives-a-coordinator.drv") &&
              absl::StrContains(h->stdout_data, "\"running\"");
    if (!running) absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_TRUE(running) << "the job never ran";
  farm_.KillCoordinator(SIGKILL);
  ASSERT_TRUE(farm_.RestartCoordinator().ok());
  EXPECT_EQ(WaitBuild(client), 0);
  EXPECT_EQ(FirstLineOfOutput("restart-nix", work_.Sub("restart/default.nix")), marker);
}

// The hash Nix (or the gateway) says a FOD's output really has.
std::string GotHash(const std::string& text) {
  std::smatch m;
  return std::regex_search(text, m, std::regex(R"(got:\s+(sha256-[A-Za-z0-9+/=]+))")) ? m[1].str() : "";
}

constexpr char kFakeHash[] = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

// A fixed-output derivation with a fake hash, sent by plain nix-build: the
// first build fails on a worker with Nix's mismatch, which the FOD cache
// learns; the next fails at once with the right hash and `kiln build`'s
// message, with no job; with the right hash it builds. And a FOD whose hash
// `kiln build` computed (from the .drv files, its input derivation
// resolved) is known to the gateway too: one key for both.
TEST_F(ServeNixE2eTest, AFakeHashedFodFailsFastWithTheRightHash) {
  const auto fod_file = [&](const std::string& dir, const std::string& name, const std::string& hash) {
    const std::string file = work_.Sub(dir + "/default.nix");
    testing::WriteFileOrDie(file, absl::StrCat(R"(let
  lock = derivation {
    name = "lockfile"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo pinned-deps-v1 > $out" ];
  };
in derivation {
  name = ")",
                                               name, R"("; system = "x86_64-linux"; builder = "/bin/sh"; inherit lock;
  args = [ "-c" "read l < $lock; echo vendored $l > $out" ];
  outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = ")",
                                               hash, R"(";
})"));
    return file;
  };
  // 1. Learnt through the gateway.
  CommandResult first = BuildOnFarm("fod-nix", fod_file("fod", "gateway-deps", kFakeHash));
  ASSERT_FALSE(first.exit.Success());
  const std::string right = GotHash(first.stderr_data);
  ASSERT_FALSE(right.empty()) << first.stderr_data;
  EXPECT_TRUE(absl::StrContains(first.stderr_data, "hash mismatch in fixed-output derivation")) << first.stderr_data;
  EXPECT_EQ(BuildsetsFor("-gateway-deps.drv"), 1);
  CommandResult again = BuildOnFarm("fod-nix", fod_file("fod", "gateway-deps", kFakeHash));
  ASSERT_FALSE(again.exit.Success());
  EXPECT_EQ(GotHash(again.stderr_data), right) << again.stderr_data;
  EXPECT_TRUE(absl::StrContains(again.stderr_data, "from Kiln's FOD cache")) << again.stderr_data;
  EXPECT_TRUE(absl::StrContains(again.stderr_data,
                                absl::StrCat("fix: in the FOD 'gateway-deps', set outputHash = \"", right, "\";")))
      << again.stderr_data;
  EXPECT_EQ(BuildsetsFor("-gateway-deps.drv"), 1) << "failed fast, yet a job ran";
  // The right hash builds (and verifies the cache's entry).
  CommandResult fixed = BuildOnFarm("fod-nix", fod_file("fod", "gateway-deps", right));
  ASSERT_TRUE(fixed.exit.Success()) << fixed.stderr_data;
  EXPECT_EQ(FirstLineOfOutput("fod-nix", work_.Sub("fod/default.nix")), "vendored pinned-deps-v1");

  // 2. Learnt by `kiln build` of a flake holding the same derivation.
  const std::string flake_fod = fod_file("fodsvc", "flake-deps", kFakeHash);
  testing::WriteFileOrDie(work_.Sub("fodsvc/flake.nix"),
                          R"({ outputs = { self }: { packages.x86_64-linux.default = import ./default.nix; }; })");
  absl::StatusOr<CommandResult> kiln_build = farm_.Kiln({"build", work_.Sub("fodsvc")});
  ASSERT_TRUE(kiln_build.ok());
  ASSERT_NE(kiln_build->exit.exit_code, 0);
  const std::string flake_right = GotHash(kiln_build->stdout_data + kiln_build->stderr_data);
  ASSERT_FALSE(flake_right.empty()) << kiln_build->stdout_data << kiln_build->stderr_data;
  CommandResult via_gateway = BuildOnFarm("fod-nix", flake_fod);
  ASSERT_FALSE(via_gateway.exit.Success());
  EXPECT_EQ(GotHash(via_gateway.stderr_data), flake_right) << via_gateway.stderr_data;
  EXPECT_TRUE(absl::StrContains(via_gateway.stderr_data, "from Kiln's FOD cache")) << via_gateway.stderr_data;
  EXPECT_EQ(BuildsetsFor("-flake-deps.drv"), 0) << "the gateway did not know the hash kiln build computed";
}

// The farm as the client's store, not only its builder: the .drv files
// copied there, `nix-store --realise --store ssh://…` builds the graph on
// the farm (build-paths); and a closure in `nix-store --export`'s format
// (import-paths, what old clients send) is added.
TEST_F(ServeNixE2eTest, TheFarmAsTheClientsStoreBuildsPathsAndImportsExports) {
  const std::string marker = absl::StrCat("realised-", absl::ToUnixNanos(absl::Now()));
  testing::WriteFileOrDie(work_.Sub("paths/default.nix"),
                          absl::StrCat(R"(let
  step = name: deps: derivation {
    inherit name deps; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "{ echo ${name} )",
                                       marker, R"(; for d in $deps; do read l < $d; echo $l; done; } > $out" ];
  };
  base = step "p-base" [ ];
in step "p-top" [ (step "p-left" [ base ]) (step "p-right" [ base ]) ])"));
  CommandResult drv = OnLaptop("paths-nix", {"nix-instantiate", work_.Sub("paths/default.nix")});
  ASSERT_TRUE(drv.exit.Success()) << drv.stderr_data;
  const std::string drv_path(absl::StripAsciiWhitespace(drv.stdout_data));
  CommandResult copied = OnLaptop("paths-nix", {"nix-copy-closure", "--to", "root@127.0.0.1", drv_path});
  ASSERT_TRUE(copied.exit.Success()) << copied.stderr_data << sshd_->LogText();
  // Nix 2.8's own build-paths clients (`nix-store --realise --store
  // ssh://…`) stop before it: they read the .drv through a file accessor
  // the ssh store lacks. So the request is sent raw, as a client lays it out.
  ServeWriter build_paths;
  build_paths.U64(kServeMagic1).U64(kServeProtocolVersion);
  build_paths.U64(static_cast<uint64_t>(ServeCommand::kBuildPaths)).Strings({drv_path + "!out"});
  WriteServeBuildOptions(build_paths, {.max_silent_time = 60}, kServeProtocolVersion);
  const std::string built = RawSession(build_paths.data(), 24);
  EXPECT_EQ(built, ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion).U64(0).data()) << sshd_->LogText();
  EXPECT_EQ(BuildsetsFor("-p-base.drv") + BuildsetsFor("-p-left.drv") + BuildsetsFor("-p-right.drv") +
                BuildsetsFor("-p-top.drv"),
            4);
  CommandResult outputs = OnLaptop("paths-nix", {"nix-store", "--query", "--outputs", drv_path});
  ASSERT_TRUE(outputs.exit.Success()) << outputs.stderr_data;
  const std::string top(absl::StripAsciiWhitespace(outputs.stdout_data));
  CommandResult fetched = OnLaptop(
      "paths-nix", {"nix", "copy", "--from", sshd_->StoreUri(), "--option", "trusted-public-keys", public_key_, top});
  ASSERT_TRUE(fetched.exit.Success()) << fetched.stderr_data;
  EXPECT_EQ(testing::ReadFileOrDie(work_.Sub("paths-nix/store/") + top.substr(11)),
            absl::StrCat("p-top ", marker, "\np-left ", marker, "\np-right ", marker, "\n"));
  // Again: everything is in the farm store, nothing is built.
  EXPECT_EQ(RawSession(build_paths.data(), 24), built);
  EXPECT_EQ(BuildsetsFor("-p-top.drv"), 1);

  // A closure exported by Nix 2.8, sent as import-paths.
  testing::WriteFileOrDie(work_.Sub("exported/default.nix"), absl::StrCat(R"(let
  dep = derivation { name = "exp-dep"; system = "x86_64-linux"; builder = "/bin/sh";
                     args = [ "-c" "echo )",
                                                                          marker, R"( > $out" ]; };
in derivation { name = "exp-top"; system = "x86_64-linux"; builder = "/bin/sh"; inherit dep;
                args = [ "-c" "echo $dep > $out" ]; })"));
  CommandResult local = OnLaptop("export-nix", {"nix-build", "--no-out-link", work_.Sub("exported/default.nix")});
  ASSERT_TRUE(local.exit.Success()) << local.stderr_data;
  const std::string exp_top(absl::StripAsciiWhitespace(local.stdout_data));
  CommandResult exported =
      OnLaptop("export-nix", {"/bin/sh", "-c", absl::StrCat("nix-store --export $(nix-store -qR ", exp_top, ")")});
  ASSERT_TRUE(exported.exit.Success()) << exported.stderr_data;
  ServeWriter import_paths;
  import_paths.U64(kServeMagic1).U64(kServeProtocolVersion).U64(static_cast<uint64_t>(ServeCommand::kImportPaths));
  import_paths.Raw(exported.stdout_data);
  EXPECT_EQ(RawSession(import_paths.data(), 24),
            ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion).U64(1).data())
      << sshd_->LogText();
  CommandResult info = OnLaptop("probe-nix", {"nix", "path-info", "--json", "--store", sshd_->StoreUri(), exp_top});
  ASSERT_TRUE(info.exit.Success()) << info.stderr_data;
  CommandResult local_info = OnLaptop("export-nix", {"nix", "path-info", "--json", exp_top});
  ASSERT_TRUE(local_info.exit.Success());
  EXPECT_EQ(nlohmann::json::parse(info.stdout_data)[0]["narHash"],
            nlohmann::json::parse(local_info.stdout_data)[0]["narHash"]);
}

// ssh-ng:// — the daemon protocol, which many configure instead — through
// the same forced command: nix-build offloads a graph whose leaf takes a
// source file the farm lacks (uploaded with add-multiple-to-store), and
// the farm store reads as an ssh-ng store.
TEST_F(ServeNixE2eTest, SshNgBuildersAndStoresUseTheSameGateway) {
  const std::string marker = absl::StrCat("ng-", absl::ToUnixNanos(absl::Now()));
  testing::WriteFileOrDie(work_.Sub("ng/input.txt"), marker + "\n");
  testing::WriteFileOrDie(work_.Sub("ng/default.nix"), R"(let
  step = name: deps: derivation {
    inherit name deps; system = "x86_64-linux"; builder = "/bin/sh"; src = ./input.txt;
    args = [ "-c" "{ read l < $src; echo ${name} $l; for d in $deps; do read l < $d; echo $l; done; } > $out" ];
  };
in step "ng-top" [ (step "ng-a" [ ]) (step "ng-b" [ ]) ])");
  const std::string ng = "ssh-ng://root@127.0.0.1";
  CommandResult built = OnLaptop("ng-nix", {"nix-build", "--no-out-link", "-j0", "--option", "builders",
                                            ng + " x86_64-linux - 4 1", work_.Sub("ng/default.nix")});
  ASSERT_TRUE(built.exit.Success()) << built.stderr_data << sshd_->LogText();
  const std::string top(absl::StripAsciiWhitespace(built.stdout_data));
  EXPECT_EQ(testing::ReadFileOrDie(work_.Sub("ng-nix/store/") + top.substr(11)),
            absl::StrCat("ng-top ", marker, "\nng-a ", marker, "\nng-b ", marker, "\n"));
  EXPECT_EQ(BuildsetsFor("-ng-top.drv") + BuildsetsFor("-ng-a.drv") + BuildsetsFor("-ng-b.drv"), 3);
  EXPECT_TRUE(absl::StrContains(built.stderr_data, "kiln: building")) << built.stderr_data;

  // The farm store as an ssh-ng store: path infos with the farm's
  // signatures, and a closure copied with them checked.
  CommandResult info = OnLaptop("probe-nix", {"nix", "path-info", "--json", "--sigs", "--store", ng, top});
  ASSERT_TRUE(info.exit.Success()) << info.stderr_data;
  EXPECT_TRUE(absl::StrContains(info.stdout_data, "kiln-farm-1:")) << info.stdout_data;
  CommandResult copied =
      OnLaptop("ng-copy-nix", {"nix", "copy", "--from", ng, "--option", "trusted-public-keys", public_key_, top});
  ASSERT_TRUE(copied.exit.Success()) << copied.stderr_data;
  EXPECT_EQ(testing::ReadFileOrDie(work_.Sub("ng-copy-nix/store/") + top.substr(11)),
            testing::ReadFileOrDie(work_.Sub("ng-nix/store/") + top.substr(11)));
}

TEST_F(ServeNixE2eTest, APathTheFarmLacksIsNotValid) {
  CommandResult absent = OnLaptop("probe-nix", {"nix", "path-info", "--store", sshd_->StoreUri(),
                                                "/nix/store/00000000000000000000000000000000-absent"});
  EXPECT_FALSE(absent.exit.Success());
  EXPECT_TRUE(absl::StrContains(absent.stderr_data, "is not valid")) << absent.stderr_data;
}

}  // namespace
}  // namespace kiln
