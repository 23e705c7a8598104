// `kiln build` as people and CI see it, against a real farm: on a real
// terminal (tmux) the status line, the -L log, the Ctrl-C question (cancel
// or detach); off a terminal the --json event stream and SIGTERM cancelling
// the builds.
#include <unistd.h>

#include <regex>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {
using testing::LocalFarm;
using testing::WriteFileOrDie;

// A flake whose build prints "step I NONCE" once a second, `steps` times.
std::string SteppingFlake(const std::string& nonce, int steps) {
  return absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "stepper"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "i=0; while [ $i -lt STEPS ]; do i=$((i+1)); echo step $i NONCE; /bin/sleep 1; done; echo ok > $out" ];
    };
  };
})",
                             {{"STEPS", std::to_string(steps)}, {"NONCE", nonce}});
}

std::string Nonce() { return absl::StrCat(absl::ToUnixNanos(absl::Now())); }

// A tmux server of the test's own (its own socket), one 120×30 window.
class Tmux {
 public:
  Tmux() : socket_(absl::StrCat("kiln-test-", getpid(), "-", Nonce())) {}
  ~Tmux() { Run({"kill-server"}).IgnoreError(); }

  // Runs `command` in the window through sh; the window stays open after.
  void Start(const std::string& command) {
    auto r = Run(
        {"new-session", "-d", "-s", "t", "-x", "120", "-y", "30", absl::StrCat(command, "; echo EXIT=$?; sleep 600")});
    ASSERT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : r.status().ToString());
  }
  std::string Capture() {
    auto r = Run({"capture-pane", "-p", "-t", "t"});
    return r.ok() ? r->stdout_data : "";
  }
  void SendKeys(const std::vector<std::string>& keys) {
    std::vector<std::string> args = {"send-keys", "-t", "t"};
    args.insert(args.end(), keys.begin(), keys.end());
    Run(args).IgnoreError();
  }
  // Polls the screen (bounded) until `pattern` matches; returns the last
  // screen either way.
  std::string WaitFor(const std::string& pattern, absl::Duration timeout = absl::Seconds(60)) {
    const std::regex re(pattern);
    const absl::Time give_up = absl::Now() + timeout;
    std::string screen;
    do {
      screen = Capture();
      if (std::regex_search(screen, re)) return screen;
      absl::SleepFor(absl::Milliseconds(100));
    } while (absl::Now() < give_up);
    ADD_FAILURE() << "the terminal never showed /" << pattern << "/:\n" << screen;
    return screen;
  }

 private:
  absl::StatusOr<CommandResult> Run(std::vector<std::string> args) {
    args.insert(args.begin(), {"tmux", "-L", socket_});
    return RunCommand({.argv = args, .extra_env = {}, .cwd = ""}, "", absl::Seconds(20));
  }
  std::string socket_;
};

class LiveViewE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    farm_ = new LocalFarm(/*workers=*/1);
    absl::Status s = farm_->Start();
    ASSERT_TRUE(s.ok()) << s;
  }
  static void TearDownTestSuite() {
    delete farm_;
    farm_ = nullptr;
  }
  // "kiln --coordinator=… ARGS" as one shell command line.
  std::string KilnCommand(const std::vector<std::string>& args) {
    std::vector<std::string> words = farm_->KilnSpec(args).argv;
    for (std::string& w : words) w = absl::StrCat("'", w, "'");
    return absl::StrJoin(words, " ");
  }
  std::string Flake(const std::string& name, int steps, std::string* nonce) {
    *nonce = Nonce();
    WriteFileOrDie(work_.Sub(name + "/flake.nix"), SteppingFlake(*nonce, steps));
    return work_.Sub(name);
  }
  std::string JobState(const std::string& id) {
    auto r = farm_->Kiln({"status", id, "--json"});
    if (!r.ok()) return "";
    auto j = nlohmann::json::parse(r->stdout_data, nullptr, false);
    return j.is_object() ? j.value("status", "") : "";
  }

  static LocalFarm* farm_;
  testing::TempDir work_;
};
LocalFarm* LiveViewE2eTest::farm_ = nullptr;

TEST_F(LiveViewE2eTest, TerminalShowsAStatusLinePerTargetThenTheResult) {
  std::string nonce;
  const std::string dir = Flake("status", 4, &nonce);
  Tmux tmux;
  tmux.Start(KilnCommand({"build", dir}));
  // The status line: state, target, worker, elapsed, last log line.
  tmux.WaitFor(absl::StrCat("building +", dir, "  worker-1  0:0[0-9]  stepper> step [1-4] ", nonce));
  const std::string done = tmux.WaitFor("EXIT=[0-9]+");
  EXPECT_THAT(done, ::testing::HasSubstr("EXIT=0"));
  EXPECT_TRUE(std::regex_search(done, std::regex(absl::StrCat("succeeded +", dir, R"( \(job \d+ on worker-1, )"))))
      << done;
  EXPECT_TRUE(std::regex_search(done, std::regex("/nix/store/[a-z0-9]+-stepper"))) << done;
  // Without -L the log lived only in the status line, now gone.
  EXPECT_THAT(done, ::testing::Not(::testing::HasSubstr("stepper> step 1")));
  EXPECT_THAT(done, ::testing::Not(::testing::HasSubstr("building  ")));
}

TEST_F(LiveViewE2eTest, DashLKeepsTheFullLogAboveTheStatusLine) {
  std::string nonce;
  const std::string dir = Flake("full", 3, &nonce);
  Tmux tmux;
  tmux.Start(KilnCommand({"build", dir, "-L"}));
  const std::string done = tmux.WaitFor("EXIT=[0-9]+");
  EXPECT_THAT(done, ::testing::HasSubstr("EXIT=0"));
  for (int i = 1; i <= 3; ++i) {
    EXPECT_THAT(done, ::testing::HasSubstr(absl::StrCat("stepper> step ", i, " ", nonce))) << done;
  }
}

// The job id in a final line "STATE  TARGET (job N on …".
std::string JobIdOnScreen(const std::string& screen) {
  std::smatch m;
  return std::regex_search(screen, m, std::regex(R"(\(job (\d+))")) ? std::string(m[1]) : "";
}

TEST_F(LiveViewE2eTest, CtrlCAsksThenCancelsTheRemoteBuild) {
  std::string nonce;
  const std::string dir = Flake("cancel", 120, &nonce);
  Tmux tmux;
  tmux.Start(KilnCommand({"build", dir}));
  tmux.WaitFor(absl::StrCat("stepper> step [0-9]+ ", nonce));
  tmux.SendKeys({"C-c"});
  tmux.WaitFor(R"(\[c\]ancel the build\(s\), \[d\]etach \(they keep running\), \[r\]esume\?)");
  tmux.SendKeys({"c", "Enter"});
  const std::string done = tmux.WaitFor("EXIT=[0-9]+");
  EXPECT_THAT(done, ::testing::HasSubstr("EXIT=130"));
  EXPECT_TRUE(std::regex_search(done, std::regex(absl::StrCat("cancelled +", dir)))) << done;
  const std::string id = JobIdOnScreen(done);
  ASSERT_FALSE(id.empty()) << done;
  EXPECT_EQ(JobState(id), "cancelled");
}

TEST_F(LiveViewE2eTest, CtrlCThenDetachLeavesTheBuildRunning) {
  std::string nonce;
  const std::string dir = Flake("detach", 4, &nonce);
  Tmux tmux;
  tmux.Start(KilnCommand({"build", dir}));
  tmux.WaitFor(absl::StrCat("stepper> step [0-9]+ ", nonce));
  tmux.SendKeys({"C-c"});
  tmux.WaitFor(R"(\[r\]esume\?)");
  tmux.SendKeys({"d", "Enter"});
  const std::string done = tmux.WaitFor("EXIT=[0-9]+");
  EXPECT_THAT(done, ::testing::HasSubstr("EXIT=0"));
  EXPECT_THAT(done, ::testing::HasSubstr("detached; the farm keeps building"));
  // Like --detach, the job id on stdout.
  std::smatch m;
  ASSERT_TRUE(std::regex_search(done, m, std::regex(R"(\n(\d+)\nEXIT=0)"))) << done;
  const std::string id = m[1];
  std::string state;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(60); absl::Now() < give_up;) {
    state = JobState(id);
    if (state == "succeeded" || state == "failed" || state == "cancelled") break;
    absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_EQ(state, "succeeded");
}

TEST_F(LiveViewE2eTest, JsonEventsDescribeTheBuildLineByLine) {
  std::string nonce;
  const std::string dir = Flake("events", 2, &nonce);
  auto r = farm_->Kiln({"build", dir, "--json"});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->exit.exit_code, 0) << r->stderr_data;
  // stdout: the result only, as before.
  auto result = nlohmann::json::parse(r->stdout_data);
  const std::string id = result[0]["jobId"];
  // stderr: one event object per line, in order.
  std::vector<std::string> kinds;
  std::vector<std::string> log;
  for (absl::string_view line : absl::StrSplit(r->stderr_data, '\n', absl::SkipEmpty())) {
    auto event = nlohmann::json::parse(line, nullptr, false);
    ASSERT_TRUE(event.is_object()) << "not a JSON object: " << line;
    ASSERT_TRUE(event["time"].is_string() && event["event"].is_string()) << line;
    const std::string kind = event["event"];
    if (kind == "message") continue;
    EXPECT_EQ(event.value("jobId", ""), id) << line;
    if (kind == "log") {
      log.push_back(absl::StrCat(event["derivation"].get<std::string>(), "> ", event["text"].get<std::string>()));
      if (!kinds.empty() && kinds.back() == "log") continue;
    }
    kinds.push_back(kind);
  }
  EXPECT_THAT(kinds, ::testing::ElementsAre("submitted", "queued", "assigned", "started", "log", "finished"));
  EXPECT_THAT(log, ::testing::Contains(absl::StrCat("stepper> step 1 ", nonce)));
  EXPECT_THAT(log, ::testing::Contains(absl::StrCat("stepper> step 2 ", nonce)));
  const auto last = nlohmann::json::parse(std::string(absl::StripTrailingAsciiWhitespace(
      r->stderr_data.substr(r->stderr_data.rfind('\n', r->stderr_data.size() - 2) + 1))));
  EXPECT_EQ(last["event"], "finished");
  EXPECT_EQ(last["status"], "succeeded");
  EXPECT_EQ(last["worker"], "worker-1");
}

TEST_F(LiveViewE2eTest, SigtermOffATerminalCancelsTheRemoteBuild) {
  // CI aborting a job sends SIGTERM: the builds it started must stop too.
  std::string nonce;
  const std::string dir = Flake("ci-abort", 120, &nonce);
  std::vector<std::string> argv = {"timeout", "--preserve-status", "-s", "TERM", "6"};
  for (const std::string& a : farm_->KilnSpec({"build", dir}).argv) argv.push_back(a);
  auto r = RunCommand({.argv = argv, .extra_env = {}, .cwd = ""}, "", absl::Seconds(120));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->exit.exit_code, 130) << r->stderr_data;
  EXPECT_THAT(r->stderr_data, ::testing::HasSubstr("kiln: interrupted: cancelling the remote build(s)"));
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r->stderr_data, m, std::regex(R"(queued as job (\d+))"))) << r->stderr_data;
  EXPECT_EQ(JobState(m[1]), "cancelled");
}

}  // namespace
}  // namespace kiln
