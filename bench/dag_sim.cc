// kiln-dag-bench: the step graph (coordinator/step_graph.h) alone, driving
// simulated workers: a random derivation graph of --steps steps with
// heavy-tailed durations runs on --slots slots, event by event. Prints
// name=value lines: the makespan over its lower bound max(critical path,
// total work / slots), and the graph's decisions per second (steps taken
// and released, over the CPU time spent in its calls).
//
// The graph: step i takes 0 inputs (one in 20 steps, and the first 50) or
// 1 to 4 among the 400 steps before it, so chains run deep and fan in. Its
// derivation name is one of 500; each name's mean duration is drawn from a
// Pareto law (shape 1.2, from 1 s, at most 30 minutes), and a build of it
// takes that mean times a log-normal factor (sigma 0.3). The duration model
// knows each name's mean, as the records of earlier builds would tell it.
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <ctime>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "coordinator/step_graph.h"

ABSL_FLAG(int, steps, 10000, "steps in the graph");
ABSL_FLAG(int, slots, 16, "simulated worker slots");
ABSL_FLAG(uint64_t, seed, 1, "random seed");
ABSL_FLAG(std::string, prefix, "dag_sim", "prefix of the printed names");
ABSL_FLAG(bool, history, true,
          "the duration model knows each name's mean (false: every step is expected to take the default, so the "
          "critical path counts steps, not time)");

namespace {

double CpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int n = absl::GetFlag(FLAGS_steps);
  const int slots = absl::GetFlag(FLAGS_slots);
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::lognormal_distribution<double> noise(0.0, 0.3);

  constexpr int kNames = 500;
  std::vector<double> name_mean(kNames);
  for (double& m : name_mean) m = std::min(1800.0, 1.0 / std::pow(1.0 - unit(rng), 1.0 / 1.2));
  kiln::DurationModel model(absl::Seconds(30));
  if (absl::GetFlag(FLAGS_history)) {
    for (int i = 0; i < kNames; ++i) model.Record(absl::StrCat("name-", i), absl::Seconds(name_mean[i]));
  }

  std::vector<kiln::StepSpec> closure(n);
  std::vector<double> duration(n);
  std::vector<bool> needed(n, false);
  std::vector<std::vector<int>> inputs(n);
  for (int i = 0; i < n; ++i) {
    closure[i].drv_path = absl::StrCat("/nix/store/step-", i, ".drv");
    const int name = static_cast<int>(rng() % kNames);
    closure[i].name = absl::StrCat("name-", name);
    duration[i] = name_mean[name] * noise(rng);
    if (i >= 50 && unit(rng) >= 0.05) {
      const int k = 1 + static_cast<int>(rng() % 4);
      for (int e = 0; e < k; ++e) {
        const int from = i - 1 - static_cast<int>(rng() % std::min(i, 400));
        if (std::find(inputs[i].begin(), inputs[i].end(), from) != inputs[i].end()) continue;
        inputs[i].push_back(from);
        closure[i].inputs.push_back(closure[from].drv_path);
        needed[from] = true;
      }
    }
  }
  std::vector<std::string> tops;
  for (int i = 0; i < n; ++i) {
    if (!needed[i]) tops.push_back(closure[i].drv_path);
  }
  // The lower bound, with the durations the builds really take.
  std::vector<double> finish(n);
  double critical = 0, total = 0;
  for (int i = 0; i < n; ++i) {
    double start = 0;
    for (int in : inputs[i]) start = std::max(start, finish[in]);
    finish[i] = start + duration[i];
    critical = std::max(critical, finish[i]);
    total += duration[i];
  }
  const double lower_bound = std::max(critical, total / slots);

  kiln::StepGraph graph(&model);
  double graph_cpu = 0;
  uint64_t decisions = 0;
  double t0 = CpuSeconds();
  absl::StatusOr<kiln::StepEffects> added = graph.AddJob("job", 1, tops, closure, {});
  graph_cpu += CpuSeconds() - t0;
  if (!added.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(added.status().message()).c_str());
    return 1;
  }
  // Simulated time: completions in order; free slots take runnable steps.
  using Event = std::pair<double, int>;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> running;
  double now = 0;
  int free = slots, finished_jobs = 0;
  for (;;) {
    t0 = CpuSeconds();
    const std::vector<std::string> next = graph.Runnable(static_cast<size_t>(free));
    for (const std::string& drv : next) {
      (void)graph.Started(drv);
      const int i = std::stoi(drv.substr(drv.rfind('-') + 1));
      running.emplace(now + duration[i], i);
      --free;
      ++decisions;
    }
    graph_cpu += CpuSeconds() - t0;
    if (running.empty()) break;
    const auto [at, i] = running.top();
    running.pop();
    now = at;
    ++free;
    t0 = CpuSeconds();
    absl::StatusOr<kiln::StepEffects> done = graph.Succeeded(closure[i].drv_path);
    graph_cpu += CpuSeconds() - t0;
    ++decisions;
    if (done.ok()) finished_jobs += static_cast<int>(done->jobs_finished.size());
  }
  if (finished_jobs != 1) {
    std::fprintf(stderr, "error: the job did not finish\n");
    return 1;
  }
  const std::string p = absl::StrCat(absl::GetFlag(FLAGS_prefix), "_steps_", n, "_slots_", slots);
  std::printf("%s_critical_path_s=%.0f\n", p.c_str(), critical);
  std::printf("%s_work_over_slots_s=%.0f\n", p.c_str(), total / slots);
  std::printf("%s_makespan_s=%.0f\n", p.c_str(), now);
  std::printf("%s_decisions_per_second=%.0f\n", p.c_str(), decisions / std::max(graph_cpu, 1e-9));
  std::printf("%s_makespan_over_lower_bound=%.3f\n", p.c_str(), now / lower_bound);
  return 0;
}
