// Shutdown under load, many times: a coordinator and two workers (each on a
// Nix store of its own) get SIGTERM while builds run, stream logs, finish,
// and are being cancelled, at varied moments and in varied orders. Every
// daemon must exit 0 each time — no abort, no crash, no hang past the stop
// timeout (LocalFarm's teardown checks this and keeps the logs otherwise).
//
// The scenarios are a fixed, seeded sequence, so a failing iteration can be
// replayed with KILN_STRESS_FIRST=N KILN_STRESS_ITERATIONS=1. Bounded by
// KILN_STRESS_ITERATIONS (default 12) and KILN_STRESS_SECONDS (default 150):
// no iteration starts after that much time. The sanitizer passes run this
// test with the daemons built under ASan + UBSan and under TSan.
#include <csignal>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/random/distributions.h"
#include "absl/random/random.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/subprocess.h"
#include "tests/support/local_farm.h"

namespace kiln {
namespace {

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  int parsed = 0;
  return value != nullptr && absl::SimpleAtoi(value, &parsed) ? parsed : fallback;
}

// Four kinds of build: one writing log lines for a long time, one sleeping
// (to be cancelled), and quick ones that finish before or during the stop.
void WriteFlake(const std::string& dir, int iteration) {
  const std::string mk =
      absl::StrCat("    mk = name: script: derivation { name = \"${name}-", iteration,
                   "\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" script ]; };\n");
  testing::WriteFileOrDie(
      dir + "/flake.nix",
      absl::StrCat("{\n  outputs = { self }: let\n", mk,
                   "  in {\n    packages.x86_64-linux = {\n"
                   // Bursts of 200 lines every 20 ms for ~20 s: the log path is busy when the stop comes.
                   "      chatty = mk \"chatty\" ''i=0; while [ $i -lt 1000 ]; do j=0; while [ $j -lt 200 ]; do "
                   "echo \"line $i.$j of a build that talks a lot\"; j=$((j+1)); done; /bin/sleep 0.02; "
                   "i=$((i+1)); done; echo done > $out'';\n"
                   "      sleepy = mk \"sleepy\" ''echo going to sleep; /bin/sleep 60; echo > $out'';\n"
                   "      quick1 = mk \"quick1\" ''echo one > $out'';\n"
                   "      quick2 = mk \"quick2\" ''/bin/sleep 0.3; echo two > $out'';\n"
                   "    };\n  };\n}\n"));
}

// How one iteration stops the farm.
enum class Order { kWorkersFirst, kCoordinatorFirst, kAllAtOnce };

struct Scenario {
  absl::Duration delay;  // From submission to SIGTERM.
  Order order;
  bool cancel_first;  // `kiln cancel` of the sleeping job just before the stop.
};

Scenario ScenarioOf(int iteration) {
  // Seeded by the iteration alone: the same N is the same scenario.
  std::seed_seq seed = {iteration, 28};
  absl::InsecureBitGen gen(seed);
  static const absl::Duration kDelays[] = {absl::ZeroDuration(),    absl::Milliseconds(30),  absl::Milliseconds(150),
                                           absl::Milliseconds(400), absl::Milliseconds(900), absl::Milliseconds(1800)};
  Scenario s;
  s.delay = kDelays[iteration % 6];
  s.order = static_cast<Order>(absl::Uniform(gen, 0, 3));
  s.cancel_first = absl::Bernoulli(gen, 0.5);
  return s;
}

const char* OrderName(Order order) {
  switch (order) {
    case Order::kWorkersFirst: return "workers first";
    case Order::kCoordinatorFirst: return "coordinator first";
    case Order::kAllAtOnce: return "all at once";
  }
  return "?";
}

TEST(ShutdownStressTest, EveryDaemonExitsCleanlyOnSigtermUnderLoad) {
  const int first = EnvInt("KILN_STRESS_FIRST", 0);
  const int iterations = EnvInt("KILN_STRESS_ITERATIONS", 12);
  const absl::Time stop_starting = absl::Now() + absl::Seconds(EnvInt("KILN_STRESS_SECONDS", 150));
  int ran = 0;
  for (int i = first; i < first + iterations && absl::Now() < stop_starting; ++i, ++ran) {
    const Scenario scenario = ScenarioOf(i);
    SCOPED_TRACE(absl::StrCat("iteration ", i, ": SIGTERM ", absl::FormatDuration(scenario.delay),
                              " after submission, ", OrderName(scenario.order),
                              scenario.cancel_first ? ", a cancel just before" : ""));
    testing::LocalFarm farm(/*workers=*/2, /*max_jobs_per_worker=*/2);
    farm.UsePrivateStores();
    ASSERT_TRUE(farm.Start().ok());
    const std::string flake = farm.dir().Sub("flake");
    WriteFlake(flake, i);
    // Five jobs on four slots: one queued too.
    auto submitted = farm.Kiln({"build", "--detach", flake + "#chatty", flake + "#sleepy", flake + "#quick1",
                                flake + "#quick2", flake + "#sleepy-again"});
    ASSERT_TRUE(submitted.ok());
    // (The fifth target names no attribute: it fails at evaluation, a path
    // that ends a job early.)
    std::vector<std::string> ids = absl::StrSplit(submitted->stdout_data, '\n', absl::SkipWhitespace());
    ASSERT_GE(ids.size(), 4u) << submitted->stderr_data;
    // Clients watching: the chatty build's log followed live, and a build
    // of a target already in flight (a follower of its job).
    ProcessSupervisor clients;
    for (const std::vector<std::string>& args : {std::vector<std::string>{"log", "-f", ids[0]},
                                                 std::vector<std::string>{"build", "--quiet", flake + "#quick2"}}) {
      ASSERT_TRUE(clients
                      .Spawn(
                          farm.KilnSpec(args), [](absl::string_view) {}, [](ExitInfo, std::string) {})
                      .ok());
    }
    absl::SleepFor(scenario.delay);
    if (scenario.cancel_first) {
      auto cancelled = farm.Kiln({"cancel", ids[1]}, absl::Seconds(30));
      ASSERT_TRUE(cancelled.ok());
    }
    switch (scenario.order) {
      case Order::kWorkersFirst:
        farm.KillWorker(0, SIGTERM);
        farm.KillWorker(1, SIGTERM);
        farm.KillCoordinator(SIGTERM);
        break;
      case Order::kCoordinatorFirst:
        farm.KillCoordinator(SIGTERM);
        farm.KillWorker(1, SIGTERM);
        farm.KillWorker(0, SIGTERM);
        break;
      case Order::kAllAtOnce:
        // The farm's teardown then waits for each.
        farm.SignalAll(SIGTERM);
        break;
    }
    // The farm goes here: whatever still runs gets SIGTERM; every daemon
    // must have exited 0 (a failure names the iteration above).
  }
  EXPECT_GT(ran, 0);
  std::printf("shutdown stress: %d iteration(s) from %d\n", ran, first);
}

}  // namespace
}  // namespace kiln
