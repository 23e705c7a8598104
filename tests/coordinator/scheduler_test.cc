#include "coordinator/scheduler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "absl/strings/str_cat.h"

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
  s.Enqueue("1", Req(), {}, /*front=*/true);
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

JobPlacement In(std::string buildset, int priority_class = 1, std::string locality = "") {
  return JobPlacement{
      .priority_class = priority_class, .buildset = std::move(buildset), .locality_key = std::move(locality)};
}

TEST(SchedulerTest, MoreUrgentClassesGoFirst) {
  Scheduler s;
  s.AddWorker("a", Caps(1));
  s.Enqueue("batch", Req(), In("b1", 2));
  s.Enqueue("ci", Req(), In("b2", 1));
  s.Enqueue("interactive", Req(), In("b3", 0));
  std::vector<std::string> order;
  for (int i = 0; i < 3; ++i) {
    auto out = s.Assign();
    ASSERT_EQ(out.size(), 1u);
    order.push_back(out[0].job);
    s.Release(out[0].job, "a");
  }
  EXPECT_EQ(order, (std::vector<std::string>{"interactive", "ci", "batch"}));
}

TEST(SchedulerTest, ABigBuildsetDelaysASingleJobOfTheSameClassByAtMostOneSlot) {
  Scheduler s;
  s.AddWorker("a", Caps(2));
  for (int i = 0; i < 500; ++i) s.Enqueue(absl::StrCat("ci-", i), Req(), In("monorepo"));
  ASSERT_EQ(s.Assign().size(), 2u);  // The buildset fills the farm.
  s.Enqueue("dev", Req(), In("laptop"));
  // Slots free up one at a time; the single job must get the first or the
  // second of them.
  int slots_until_dev = 0;
  std::string running[2] = {"ci-0", "ci-1"};
  for (int turn = 0; turn < 2; ++turn) {
    ASSERT_TRUE(s.Release(running[turn % 2], "a"));
    auto out = s.Assign();
    ASSERT_EQ(out.size(), 1u);
    ++slots_until_dev;
    if (out[0].job == "dev") break;
    running[turn % 2] = out[0].job;
  }
  EXPECT_EQ(s.WorkerOf("dev"), "a");
  EXPECT_LE(slots_until_dev, 2);
  // Round-robin between active buildsets: with three sharing one worker,
  // each gets every third slot.
  Scheduler rr;
  rr.AddWorker("w", Caps(1));
  for (int i = 0; i < 6; ++i) {
    for (const char* b : {"x", "y", "z"}) rr.Enqueue(absl::StrCat(b, i), Req(), In(b));
  }
  std::string sequence;
  for (int i = 0; i < 9; ++i) {
    auto out = rr.Assign();
    ASSERT_EQ(out.size(), 1u);
    sequence += out[0].job.substr(0, 1);
    rr.Release(out[0].job, "w");
  }
  EXPECT_EQ(sequence, "xyzxyzxyz");
}

TEST(SchedulerTest, LocalityKeepsAKeyOnOneWorkerAndFallsBackWhenItIsFull) {
  Scheduler s;
  for (const char* w : {"a", "b", "c"}) s.AddWorker(w, Caps(4));
  // Same key, same worker, every time.
  std::string first;
  for (int i = 0; i < 3; ++i) {
    s.Enqueue(absl::StrCat("j", i), Req(), In("bs", 1, "services/api#image"));
    auto out = s.Assign();
    ASSERT_EQ(out.size(), 1u);
    if (first.empty()) first = out[0].worker;
    EXPECT_EQ(out[0].worker, first);
  }
  // Its worker has one slot left; the next two go there, then elsewhere.
  s.Enqueue("j3", Req(), In("bs", 1, "services/api#image"));
  s.Enqueue("j4", Req(), In("bs", 1, "services/api#image"));
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].worker, first);
  EXPECT_NE(out[1].worker, first);
  // A draining worker is not preferred and takes nothing new.
  ASSERT_TRUE(s.SetDraining(out[1].worker, true));
  s.Enqueue("j5", Req(), In("bs", 1, "services/api#image"));
  out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_NE(out[0].worker, first);
}

TEST(HashRingTest, SpreadsKeysByWeightAndMovesFewWhenAMemberJoins) {
  HashRing weighted({{"fast", 3.0}, {"slow", 1.0}});
  int fast = 0;
  for (int i = 0; i < 4000; ++i) fast += weighted.Owner(absl::StrCat("key", i)) == 0 ? 1 : 0;
  EXPECT_NEAR(fast / 4000.0, 0.75, 0.05);

  HashRing three({{"a", 1}, {"b", 1}, {"c", 1}});
  HashRing four({{"a", 1}, {"b", 1}, {"c", 1}, {"d", 1}});
  int moved = 0;
  for (int i = 0; i < 4000; ++i) {
    const std::string key = absl::StrCat("flake", i);
    const uint32_t before = three.Owner(key), after = four.Owner(key);
    if (before != after) {
      ++moved;
      EXPECT_EQ(after, 3u) << key;  // Keys only move to the newcomer.
    }
  }
  EXPECT_NEAR(moved / 4000.0, 0.25, 0.05);
  // A walk visits every member once, starting at the owner.
  std::vector<uint32_t> order;
  four.Walk("flake7", [&](uint32_t m) {
    order.push_back(m);
    return false;
  });
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0], four.Owner("flake7"));
  std::sort(order.begin(), order.end());
  EXPECT_EQ(order, (std::vector<uint32_t>{0, 1, 2, 3}));
}

TEST(SchedulerTest, AFullPreferredWorkerSendsTheJobToTheLeastLoadedOfTheNextOnTheRing) {
  Scheduler s;
  for (int i = 0; i < 20; ++i) s.AddWorker(absl::StrCat("w", i), Caps(2));
  // Find a key's preferred worker, fill it, and load every other worker but
  // one by one job: the spill-over must avoid the loaded ones where it can.
  s.Enqueue("probe", Req(), In("bs", 1, "key"));
  const std::string preferred = s.Assign().at(0).worker;
  s.Enqueue("probe2", Req(), In("bs", 1, "key"));
  ASSERT_EQ(s.Assign().at(0).worker, preferred);
  s.Enqueue("spill", Req(), In("bs", 1, "key"));
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_NE(out[0].worker, preferred);
  EXPECT_EQ(s.JobsOf(out[0].worker).size(), 1u);  // It was idle.
}

TEST(SchedulerTest, DrainingWorkersTakeNothingNewAndSaySo) {
  Scheduler s;
  s.AddWorker("a", Caps(2));
  s.Enqueue("1", Req());
  ASSERT_EQ(s.Assign().size(), 1u);
  ASSERT_TRUE(s.SetDraining("a", true));
  EXPECT_FALSE(s.SetDraining("nobody", true));
  s.Enqueue("2", Req());
  EXPECT_TRUE(s.Assign().empty());
  EXPECT_EQ(s.WaitingReason("2"), "all 1 capable workers are draining");
  EXPECT_TRUE(s.Release("1", "a"));  // Running jobs finish normally.
  ASSERT_TRUE(s.SetDraining("a", false));
  EXPECT_EQ(s.Assign().size(), 1u);
}

TEST(SchedulerTest, WorkersOverALimitTakeNothingNewAndTheReasonIsNamed) {
  Scheduler s;
  s.AddWorker("a", Caps(1));
  s.AddWorker("b", Caps(1));
  ASSERT_TRUE(s.SetOverLimit("a", "0.4 GiB free on its Nix store, below 1.0 GiB"));
  s.Enqueue("1", Req());
  s.Enqueue("2", Req());
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].worker, "b");
  EXPECT_EQ(s.WaitingReason("2"),
            "all 2 capable workers are busy, draining or over their limits (a: 0.4 GiB free on its Nix store, "
            "below 1.0 GiB)");
  ASSERT_TRUE(s.SetOverLimit("b", "memory 97% used, above 95%"));
  EXPECT_EQ(s.WaitingReason("2"),
            "all 2 capable workers are over their limits (a: 0.4 GiB free on its Nix store, below 1.0 GiB; "
            "b: memory 97% used, above 95%)");
  ASSERT_TRUE(s.SetOverLimit("a", ""));
  out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].worker, "a");
}

TEST(SchedulerTest, AJobBackingOffWaitsAndLetsOthersPass) {
  Scheduler s;
  s.AddWorker("a", Caps(1));
  const absl::Time now = absl::FromUnixSeconds(1700000000);
  JobPlacement retry = In("b1");
  retry.not_before = now + absl::Seconds(10);
  s.Enqueue("retry", Req(), retry, /*front=*/true);
  s.Enqueue("fresh", Req(), In("b1"));
  EXPECT_EQ(s.WaitingReason("retry", now), "retry back-off until 2023-11-14T22:13:30Z");
  auto out = s.Assign(now);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].job, "fresh");  // The back-off does not block the queue.
  s.Release("fresh", "a");
  EXPECT_TRUE(s.Assign(now + absl::Seconds(9)).empty());
  out = s.Assign(now + absl::Seconds(10));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].job, "retry");
}

TEST(SchedulerTest, NamesWhatNoKnownWorkerOffers) {
  Scheduler s;
  EXPECT_FALSE(s.has_known_workers());
  auto labelled = Caps(1, {"big-parallel"}, {"nixos-test"});
  labelled.labels = {{"pool", "orbstack"}};
  s.AddWorker("a", labelled);
  s.RemoveWorker("a");  // Known even while disconnected.
  EXPECT_TRUE(s.has_known_workers());
  EXPECT_EQ(s.UnmetByKnownWorkers(Req({}, "aarch64-linux")), "no worker offers system aarch64-linux");
  EXPECT_EQ(s.UnmetByKnownWorkers(Req({"kvm", "nixos-test"})), "no worker offers feature kvm");
  auto pinned = Req({"nixos-test"});
  pinned.pinned_labels = {{"pool", "eu-host"}};
  EXPECT_EQ(s.UnmetByKnownWorkers(pinned), "no worker has label pool=eu-host");
  EXPECT_THAT(s.UnmetByKnownWorkers(Req()), ::testing::HasSubstr("mandatory features"));
  EXPECT_EQ(s.UnmetByKnownWorkers(Req({"nixos-test", "big-parallel"})), "");
}

// The free-slot count is kept incrementally for speed; a seeded random walk
// over every kind of event checks it never drifts from a recount, and that
// no job is lost or placed twice.
TEST(SchedulerTest, FreeSlotBookkeepingSurvivesARandomWalkOfEvents) {
  Scheduler s;
  std::mt19937 rng(42);
  std::set<std::string> running;
  int next_job = 0;
  for (int step = 0; step < 20000; ++step) {
    const std::string w = absl::StrCat("w", rng() % 6);
    switch (rng() % 9) {
      case 0: s.AddWorker(w, Caps(1 + static_cast<int>(rng() % 3))); break;
      case 1:
        for (const auto& j : s.RemoveWorker(w)) running.erase(j);
        break;
      case 2: s.SetOnline(w, rng() % 2 == 0); break;
      case 3: s.SetDraining(w, rng() % 3 == 0); break;
      case 4: s.SetOverLimit(w, rng() % 3 == 0 ? "disk" : ""); break;
      case 5:
      case 6: s.Enqueue(absl::StrCat("j", next_job++), Req(), In(absl::StrCat("b", rng() % 3), 1, w)); break;
      case 7:
        for (const auto& a : s.Assign()) EXPECT_TRUE(running.insert(a.job).second) << a.job << " placed twice";
        break;
      case 8:
        if (!running.empty()) {
          auto it = running.begin();
          std::advance(it, rng() % running.size());
          EXPECT_TRUE(s.Release(*it, s.WorkerOf(*it)));
          running.erase(it);
        }
        break;
    }
    ASSERT_EQ(s.free_slots(), s.CountFreeSlots()) << "after step " << step;
    ASSERT_EQ(s.running(), running.size());
  }
}

TEST(SchedulerTest, CancelledJobsLeaveNoTraceInTheRotation) {
  Scheduler s;
  s.AddWorker("a", Caps(1));
  s.Enqueue("1", Req(), In("b"));
  s.Enqueue("2", Req(), In("b"));
  EXPECT_TRUE(s.Dequeue("1"));
  s.Enqueue("1", Req(), In("b"));  // Re-queued after a cancel: now behind "2".
  auto out = s.Assign();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].job, "2");
  EXPECT_EQ(s.queued(), 1u);
}

}  // namespace
}  // namespace kiln
