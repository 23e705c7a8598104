#include "coordinator/scheduler.h"

#include <gtest/gtest.h>

namespace kiln {
namespace {

WorkerCapabilities Caps(int slots, std::set<std::string> features = {}, std::set<std::string> mandatory = {},
                        std::string system = "x86_64-linux") {
  WorkerCapabilities c;
  c.systems = {system};
  c.supported_features = std::move(features);
  c.mandatory_features = std::move(mandatory);
  c.max_jobs = slots;
  return c;
}

JobRequirements Req(std::set<std::string> features = {}, std::string system = "x86_64-linux") {
  return JobRequirements{.system = std::move(system), .required_features = std::move(features), .pinned_labels = {}};
}

TEST(WorkerMatchesTest, FollowsNixRule) {
  EXPECT_TRUE(WorkerMatches(Caps(1, {"kvm", "big-parallel"}), Req({"kvm"})));
  EXPECT_FALSE(WorkerMatches(Caps(1, {"big-parallel"}), Req({"kvm"})));
  EXPECT_FALSE(WorkerMatches(Caps(1), Req({}, "aarch64-linux")));
  // Mandatory features: only jobs that ask for them.
  EXPECT_FALSE(WorkerMatches(Caps(1, {}, {"nixos-test"}), Req()));
  EXPECT_TRUE(WorkerMatches(Caps(1, {}, {"nixos-test"}), Req({"nixos-test"})));
  auto labelled = Caps(1);
  labelled.labels = {{"region", "fr-par"}};
  auto pinned = Req();
  pinned.pinned_labels = {{"region", "fr-par"}};
  EXPECT_TRUE(WorkerMatches(labelled, pinned));
  pinned.pinned_labels = {{"region", "nl-ams"}};
  EXPECT_FALSE(WorkerMatches(labelled, pinned));
}

TEST(SchedulerTest, FifoWithinSlotsAndLeastLoadedWorker) {
  Scheduler s;
  s.AddWorker("a", Caps(2));
  s.AddWorker("b", Caps(1));
  for (auto j : {"1", "2", "3", "4"}) s.Enqueue(j, Req());
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 3u);
  // Ties go by name; then the least loaded fraction wins.
  EXPECT_EQ(out[0].job, "1");
  EXPECT_EQ(out[0].worker, "a");
  EXPECT_EQ(out[1].job, "2");
  EXPECT_EQ(out[1].worker, "b");
  EXPECT_EQ(out[2].job, "3");
  EXPECT_EQ(out[2].worker, "a");
  EXPECT_EQ(s.queued(), 1u);
  EXPECT_EQ(s.WaitingReason("4"), "all 2 capable workers are busy");
  EXPECT_TRUE(s.Assign().empty());
  EXPECT_TRUE(s.Release("2", "b"));
  out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].job, "4");
  EXPECT_EQ(out[0].worker, "b");
}

TEST(SchedulerTest, SkipsJobsNoFreeWorkerMatchesWithoutBlockingOthers) {
  Scheduler s;
  s.AddWorker("plain", Caps(1));
  s.Enqueue("needs-kvm", Req({"kvm"}));
  s.Enqueue("plain-job", Req());
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].job, "plain-job");
  EXPECT_EQ(s.WaitingReason("needs-kvm"), "no connected worker offers feature kvm");
  s.Enqueue("arm", Req({}, "aarch64-linux"));
  EXPECT_EQ(s.WaitingReason("arm"), "no connected worker offers system aarch64-linux");
}

TEST(SchedulerTest, RemovedWorkerReturnsItsJobsAndStaleReleasesAreIgnored) {
  Scheduler s;
  s.AddWorker("a", Caps(2));
  s.Enqueue("1", Req());
  s.Enqueue("2", Req());
  ASSERT_EQ(s.Assign().size(), 2u);
  EXPECT_FALSE(s.Release("1", "someone-else"));
  EXPECT_EQ(s.RemoveWorker("a"), (std::vector<std::string>{"1", "2"}));
  EXPECT_EQ(s.running(), 0u);
  EXPECT_FALSE(s.Release("1", "a"));
  // A requeued job goes to the front.
  s.Enqueue("3", Req());
  s.Enqueue("1", Req(), /*front=*/true);
  s.AddWorker("b", Caps(1));
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].job, "1");
  EXPECT_EQ(s.WaitingReason("3"), "all 1 capable workers are busy");
}

TEST(SchedulerTest, DequeueAndDuplicateEnqueue) {
  Scheduler s;
  s.Enqueue("1", Req());
  s.Enqueue("1", Req());
  EXPECT_EQ(s.queued(), 1u);
  EXPECT_EQ(s.WaitingReason("1"), "no worker is connected");
  EXPECT_TRUE(s.Dequeue("1"));
  EXPECT_FALSE(s.Dequeue("1"));
  EXPECT_EQ(s.WaitingReason("1"), "");
}

}  // namespace
}  // namespace kiln
