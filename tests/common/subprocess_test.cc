#include "common/subprocess.h"

#include <gtest/gtest.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

// A child's end, as the supervisor reports it.
struct Ending {
  absl::Notification done;
  ExitInfo exit;
  ProcessSupervisor::ExitCallback Callback() {
    return [this](ExitInfo e, std::string) {
      exit = e;
      done.Notify();
    };
  }
};

TEST(RunCommandTest, CapturesOutputAndExitCode) {
  auto r = RunCommand({.argv = {"/bin/sh", "-c", "cat; echo err >&2; exit 4"}, .extra_env = {}, .cwd = ""}, "input");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->stdout_data, "input");
  EXPECT_EQ(r->stderr_data, "err\n");
  EXPECT_EQ(r->exit.exit_code, 4);
}

TEST(RunCommandTest, NoShellInterpretsArguments) {
  auto r = RunCommand({.argv = {"/bin/echo", "$(id); `id`"}, .extra_env = {}, .cwd = ""});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->stdout_data, "$(id); `id`\n");
}

TEST(RunCommandTest, TimeoutKillsTheProcessGroup) {
  auto r = RunCommand({.argv = {"/bin/sh", "-c", "sleep 30 & sleep 30"}, .extra_env = {}, .cwd = ""}, "",
                      absl::Milliseconds(200));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(RunCommandTest, MissingProgramIsAnError) {
  EXPECT_FALSE(RunCommand({.argv = {"/nonexistent/program"}, .extra_env = {}, .cwd = ""}).ok());
}

TEST(ProcessSupervisorTest, StreamsLinesAndReportsExit) {
  ProcessSupervisor supervisor;
  std::vector<std::string> lines;  // Written on the supervisor thread only.
  absl::Notification done;
  ExitInfo exit;
  std::string out;
  auto id = supervisor.Spawn(
      {.argv = {"/bin/sh", "-c", "echo one >&2; printf 'two\\nthree' >&2; echo result; exit 2"},
       .extra_env = {"KILN_TEST=1"},
       .cwd = "/"},
      [&](absl::string_view l) { lines.emplace_back(l); },
      [&](ExitInfo e, std::string o) {
        exit = e;
        out = std::move(o);
        done.Notify();
      });
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(lines, (std::vector<std::string>{"one", "two", "three"}));
  EXPECT_EQ(out, "result\n");
  EXPECT_EQ(exit.exit_code, 2);
}

TEST(ProcessSupervisorTest, KillEndsTheWholeTree) {
  ProcessSupervisor supervisor;
  Ending end;
  // The grandchild holds stderr open; only a group kill lets the exit through.
  auto id = supervisor.Spawn(
      {.argv = {"/bin/sh", "-c", "sleep 60 & sleep 60"}, .extra_env = {}, .cwd = ""}, [](absl::string_view) {},
      end.Callback());
  ASSERT_TRUE(id.ok());
  supervisor.Kill(*id);
  ASSERT_TRUE(end.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(end.exit.signal, 9);
  EXPECT_EQ(supervisor.Running(), 0u);
}

TEST(ProcessSupervisorTest, TerminateEscalatesAndReportsWhetherTheChildWasLive) {
  ProcessSupervisor supervisor;
  absl::Notification ready, done;
  ExitInfo exit;
  // Ignores SIGTERM: only the SIGKILL after the grace period ends it.
  auto id = supervisor.Spawn(
      {.argv = {"/bin/sh", "-c", "trap '' TERM; echo ready >&2; while :; do /bin/sleep 1; done"},
       .extra_env = {},
       .cwd = ""},
      [&](absl::string_view line) {
        if (line == "ready") ready.Notify();
      },
      [&](ExitInfo e, std::string) {
        exit = e;
        done.Notify();
      });
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(ready.WaitForNotificationWithTimeout(absl::Seconds(30)));  // The trap is set.
  EXPECT_TRUE(supervisor.Terminate(*id, absl::Milliseconds(300)));
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(exit.signal, 9);
  EXPECT_FALSE(supervisor.Terminate(*id, absl::Milliseconds(300)));  // Gone now.
}

TEST(ProcessSupervisorTest, LeftoverChildrenDoNotHoldTheResult) {
  ProcessSupervisor supervisor;
  Ending end;
  // The leader exits at once; its background child would keep the pipe open.
  auto id = supervisor.Spawn(
      {.argv = {"/bin/sh", "-c", "sleep 60 & exit 0"}, .extra_env = {}, .cwd = ""}, [](absl::string_view) {},
      end.Callback());
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(end.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(end.exit.exit_code, 0);
}

TEST(ProcessSupervisorTest, ALedgerLetsTheNextRunStopWhatACrashedOneLeftRunning) {
  namespace fs = std::filesystem;
  testing::TempDir dir;
  const std::string ledger = dir.Sub("ledger"), leftovers = dir.Sub("leftovers");
  ProcessSupervisor supervisor(ledger);
  Ending end;
  auto id = supervisor.Spawn(
      {.argv = {"/bin/sh", "-c", "sleep 60 & sleep 60"}, .extra_env = {}, .cwd = ""}, [](absl::string_view) {},
      end.Callback());
  ASSERT_TRUE(id.ok());
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(ledger)) entries.push_back(e.path());
  ASSERT_EQ(entries.size(), 1u);  // Named by the child's pid.

  // What a run that died without cleaning up leaves: its ledger. Also an
  // entry whose pid now belongs to another process (its start time differs)
  // and one that is not a pid: neither may be touched.
  fs::create_directories(leftovers);
  fs::copy_file(entries[0], fs::path(leftovers) / entries[0].filename());
  ProcessSupervisor bystanders(dir.Sub("bystander-ledger"));
  absl::Notification bystander_done;
  auto bystander = bystanders.Spawn(
      {.argv = {"sleep", "60"}, .extra_env = {}, .cwd = ""}, [](absl::string_view) {},
      [&](ExitInfo, std::string) { bystander_done.Notify(); });
  ASSERT_TRUE(bystander.ok());
  for (const auto& e : fs::directory_iterator(dir.Sub("bystander-ledger"))) {
    std::ofstream reused(fs::path(leftovers) / e.path().filename());
    reused << "1";  // Not when it started.
  }
  {
    std::ofstream junk(fs::path(leftovers) / "not-a-pid");
    junk << "1";
  }

  EXPECT_EQ(ProcessSupervisor::StopLeftovers(leftovers, absl::Seconds(10)), 1);
  ASSERT_TRUE(end.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(end.exit.signal, SIGTERM);  // Asked first; it went.
  EXPECT_TRUE(fs::is_empty(leftovers));
  EXPECT_TRUE(fs::is_empty(ledger));  // The child's own entry goes with it.
  EXPECT_FALSE(bystander_done.HasBeenNotified());
  EXPECT_EQ(bystanders.Running(), 1u);
}

TEST(ProcessSupervisorTest, TheProgramsAnUnlistedCrashLeftInItsDirectoryAreStoppedToo) {
  namespace fs = std::filesystem;
  testing::TempDir dir;
  fs::create_directories(dir.Sub("builds/1-1"));
  fs::create_directories(dir.Sub("elsewhere"));
  // No ledger: as if the run died between starting them and listing them.
  // (The endings outlive the supervisor, which ends the others at its end.)
  Ending inside, other_program, outside;
  ProcessSupervisor supervisor;
  auto spawn = [&](const std::string& program, const std::string& cwd, Ending& end) {
    ASSERT_TRUE(
        supervisor
            .Spawn(
                {.argv = {program, "60"}, .extra_env = {}, .cwd = cwd}, [](absl::string_view) {}, end.Callback())
            .ok());
  };
  spawn("sleep", dir.Sub("builds/1-1"), inside);
  spawn("/bin/sleep", dir.Sub("elsewhere"), outside);
  // Same directory, another program (an operator's shell there is not Nix).
  ASSERT_TRUE(supervisor
                  .Spawn(
                      {.argv = {"/bin/sh", "-c", "sleep 60"}, .extra_env = {}, .cwd = dir.Sub("builds")},
                      [](absl::string_view) {}, other_program.Callback())
                  .ok());
  // (posix_spawn returns once the child has exec'd, in its directory.)
  EXPECT_EQ(ProcessSupervisor::StopProcessesIn(dir.Sub("builds"), "/usr/bin/sleep", absl::Seconds(10)), 1);
  ASSERT_TRUE(inside.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(inside.exit.signal, SIGTERM);
  EXPECT_FALSE(outside.done.HasBeenNotified());
  EXPECT_FALSE(other_program.done.HasBeenNotified());
}

}  // namespace
}  // namespace kiln
