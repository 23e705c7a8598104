// The step graph, call by call: dependents released as inputs are built,
// critical path and class first, steps shared between jobs and built once,
// a failure failing only the jobs that need it, a cancel dropping only the
// steps no other job needs. No clock: expected durations are a model's.
#include "coordinator/step_graph.h"

#include <gtest/gtest.h>

namespace kiln {
namespace {

StepSpec S(const std::string& drv, std::vector<std::string> inputs = {}, const std::string& name = "") {
  return StepSpec{.drv_path = drv, .name = name.empty() ? drv : name, .inputs = std::move(inputs)};
}

std::vector<std::string> Jobs(const StepEffects& e) {
  std::vector<std::string> out;
  for (const auto& [job, outcome] : e.jobs_finished) out.push_back(job);
  return out;
}

class StepGraphTest : public ::testing::Test {
 protected:
  // Starts a runnable step and returns what its success changed.
  StepEffects Build(const std::string& drv) {
    EXPECT_TRUE(graph_.Started(drv).ok()) << drv;
    absl::StatusOr<StepEffects> e = graph_.Succeeded(drv);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *e : StepEffects{};
  }

  DurationModel durations_{absl::Seconds(10)};
  StepGraph graph_{&durations_};
};

TEST_F(StepGraphTest, DependentsAreReleasedAsTheirInputsAreBuilt) {
  // a -> b, c -> d (a diamond).
  absl::StatusOr<StepEffects> added =
      graph_.AddJob("j1", 1, {"d"}, {S("a"), S("b", {"a"}), S("c", {"a"}), S("d", {"b", "c"})}, {});
  ASSERT_TRUE(added.ok()) << added.status();
  EXPECT_EQ(added->runnable, std::vector<std::string>{"a"});
  EXPECT_TRUE(added->jobs_finished.empty());
  StepEffects after_a = Build("a");
  std::sort(after_a.runnable.begin(), after_a.runnable.end());
  EXPECT_EQ(after_a.runnable, (std::vector<std::string>{"b", "c"}));
  EXPECT_TRUE(Build("b").runnable.empty()) << "d still waits for c";
  EXPECT_EQ(graph_.state("d"), StepState::kWaiting);
  EXPECT_EQ(Build("c").runnable, std::vector<std::string>{"d"});
  const StepEffects done = Build("d");
  ASSERT_EQ(Jobs(done), std::vector<std::string>{"j1"});
  EXPECT_TRUE(done.jobs_finished[0].second.succeeded);
}

TEST_F(StepGraphTest, TheLongestRemainingChainGoesFirstThenArrival) {
  durations_.Record("slow", absl::Seconds(100));
  durations_.Record("fast", absl::Seconds(1));
  // y arrives first but is short; x1 heads a 300-s chain.
  ASSERT_TRUE(graph_
                  .AddJob("j1", 1, {"y", "x3"},
                          {S("y", {}, "fast"), S("x1", {}, "slow"), S("x2", {"x1"}, "slow"), S("x3", {"x2"}, "slow"),
                           S("z", {}, "fast")},
                          {})
                  .ok());
  EXPECT_EQ(graph_.Runnable(3), (std::vector<std::string>{"x1", "y", "z"}));
  EXPECT_EQ(graph_.RemainingCriticalPath("j1"), absl::Seconds(300));
  // A job of a more urgent class goes before any rank.
  ASSERT_TRUE(graph_.AddJob("urgent", 0, {"u"}, {S("u", {}, "fast")}, {}).ok());
  EXPECT_EQ(graph_.Runnable(1), std::vector<std::string>{"u"});
}

TEST_F(StepGraphTest, AStepSeveralJobsNeedIsBuiltOnce) {
  ASSERT_TRUE(graph_.AddJob("j1", 1, {"b"}, {S("a"), S("b", {"a"})}, {}).ok());
  ASSERT_TRUE(graph_.Started("a").ok());
  // j2 needs a too, while it runs: it waits on the same step.
  absl::StatusOr<StepEffects> j2 = graph_.AddJob("j2", 1, {"c"}, {S("a"), S("c", {"a"})}, {});
  ASSERT_TRUE(j2.ok());
  EXPECT_TRUE(j2->runnable.empty()) << "a was offered again";
  EXPECT_EQ(graph_.size(), 3u);
  absl::StatusOr<StepEffects> a = graph_.Succeeded("a");
  ASSERT_TRUE(a.ok());
  std::vector<std::string> released = a->runnable;
  std::sort(released.begin(), released.end());
  EXPECT_EQ(released, (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(Jobs(Build("b")), std::vector<std::string>{"j1"});
  EXPECT_EQ(Jobs(Build("c")), std::vector<std::string>{"j2"});
}

TEST_F(StepGraphTest, AFailedStepFailsOnlyTheJobsThatNeedIt) {
  ASSERT_TRUE(graph_.AddJob("j1", 1, {"b"}, {S("a"), S("b", {"a"})}, {}).ok());
  ASSERT_TRUE(graph_.AddJob("j2", 1, {"c"}, {S("c")}, {}).ok());
  ASSERT_TRUE(graph_.AddJob("j3", 1, {"d"}, {S("a"), S("d", {"a"})}, {}).ok());
  ASSERT_TRUE(graph_.Started("a").ok());
  absl::StatusOr<StepEffects> failed = graph_.Failed("a", "builder for 'a' failed with exit code 1");
  ASSERT_TRUE(failed.ok());
  EXPECT_EQ(Jobs(*failed), (std::vector<std::string>{"j1", "j3"}));
  for (const auto& [job, outcome] : failed->jobs_finished) {
    EXPECT_FALSE(outcome.succeeded);
    EXPECT_EQ(outcome.failed_step, "a");
    EXPECT_EQ(outcome.message, "builder for 'a' failed with exit code 1");
  }
  EXPECT_EQ(graph_.state("b"), StepState::kDropped);
  EXPECT_EQ(graph_.state("d"), StepState::kDropped);
  // The independent job goes on.
  EXPECT_EQ(Jobs(Build("c")), std::vector<std::string>{"j2"});
  // A later job needing the failed step tries it again.
  absl::StatusOr<StepEffects> again = graph_.AddJob("j4", 1, {"b"}, {S("a"), S("b", {"a"})}, {});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->runnable, std::vector<std::string>{"a"});
}

TEST_F(StepGraphTest, CancellingAJobDropsOnlyTheStepsNoOtherJobNeeds) {
  ASSERT_TRUE(graph_.AddJob("j1", 1, {"t1"}, {S("s"), S("t1", {"s"}), S("only1")}, {}).ok());
  ASSERT_TRUE(graph_.AddJob("j2", 1, {"t2"}, {S("s"), S("t2", {"s"})}, {}).ok());
  ASSERT_TRUE(graph_.Started("s").ok());
  ASSERT_TRUE(graph_.Started("only1").ok());
  const StepEffects cancelled = graph_.CancelJob("j1");
  EXPECT_EQ(Jobs(cancelled), std::vector<std::string>{"j1"});
  EXPECT_TRUE(cancelled.jobs_finished[0].second.cancelled);
  EXPECT_EQ(cancelled.stop, std::vector<std::string>{"only1"});
  EXPECT_EQ(graph_.state("s"), StepState::kRunning) << "j2 still needs it";
  EXPECT_EQ(graph_.state("t1"), StepState::kDropped);
  const StepEffects last = graph_.CancelJob("j2");
  EXPECT_EQ(last.stop, std::vector<std::string>{"s"});
  EXPECT_TRUE(graph_.Runnable(10).empty());
}

TEST_F(StepGraphTest, WhatTheFarmStoreHoldsIsDoneWithoutAWorker) {
  absl::StatusOr<StepEffects> added = graph_.AddJob("j1", 1, {"b"}, {S("a"), S("b", {"a"})}, {"a"});
  ASSERT_TRUE(added.ok());
  EXPECT_EQ(added->runnable, std::vector<std::string>{"b"});
  EXPECT_EQ(graph_.state("a"), StepState::kDone);
  absl::StatusOr<StepEffects> held = graph_.AddJob("j2", 1, {"c"}, {S("c")}, {"c"});
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(Jobs(*held), std::vector<std::string>{"j2"}) << "all its tops built: finished at once";
  EXPECT_TRUE(held->jobs_finished[0].second.succeeded);
}

TEST_F(StepGraphTest, ALostWorkersStepRunsAgainAndCountsStayTrue) {
  ASSERT_TRUE(graph_.AddJob("j1", 1, {"b"}, {S("a"), S("b", {"a"})}, {}).ok());
  ASSERT_TRUE(graph_.Started("a").ok());
  EXPECT_EQ(graph_.Counts("j1")[StepState::kRunning], 1u);
  ASSERT_TRUE(graph_.Requeue("a").ok());
  EXPECT_EQ(graph_.Runnable(5), std::vector<std::string>{"a"});
  EXPECT_EQ(graph_.Counts("j1")[StepState::kRunnable], 1u);
  EXPECT_EQ(graph_.Counts("j1")[StepState::kWaiting], 1u);
  EXPECT_FALSE(graph_.Succeeded("a").ok()) << "not running";
  EXPECT_FALSE(graph_.Requeue("b").ok());
}

TEST_F(StepGraphTest, BadGraphsAreRefusedAndChangeNothing) {
  EXPECT_TRUE(absl::IsInvalidArgument(graph_.AddJob("j", 1, {"a"}, {S("a", {"b"}), S("b", {"a"})}, {}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(graph_.AddJob("j", 1, {"a"}, {S("a", {"elsewhere"})}, {}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(graph_.AddJob("j", 1, {"top"}, {S("a")}, {}).status()));
  EXPECT_EQ(graph_.size(), 0u);
  ASSERT_TRUE(graph_.AddJob("j", 1, {"a"}, {S("a")}, {}).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(graph_.AddJob("j", 1, {"a"}, {S("a")}, {}).status()));
}

TEST(DurationModelTest, RecordedDurationsMoveTheAverageAThirdOfTheWay) {
  DurationModel model(absl::Seconds(30));
  EXPECT_EQ(model.Expected("rustc-1.80"), absl::Seconds(30));
  model.Record("rustc-1.80", absl::Seconds(90));
  EXPECT_EQ(model.Expected("rustc-1.80"), absl::Seconds(90));
  model.Record("rustc-1.80", absl::Seconds(60));
  EXPECT_EQ(model.Expected("rustc-1.80"), absl::Seconds(80));
}

}  // namespace
}  // namespace kiln
