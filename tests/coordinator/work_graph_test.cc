// WorkGraph on its own: jobs sharing work items, retries and their
// back-off, fencing, quotas and the group commit's bookkeeping. Times come
// from a FakeClock.
#include "coordinator/work_graph.h"

#include <gtest/gtest.h>

#include "tests/support/fake_clock.h"

namespace kiln {
namespace {

using kiln::state::v1::JobRecord;

class WorkGraphTest : public ::testing::Test {
 protected:
  // Adds a queued job of buildset `buildset` building `attr`, as Submit does.
  WorkGraph::Job& AddJob(const std::string& id, const std::string& attr, const std::string& token = "",
                         const std::string& buildset = "b1") {
    auto r = std::make_unique<JobRecord>();
    r->set_job_id(id);
    r->set_buildset_id(buildset);
    r->set_token(token);
    r->set_state(kiln::v1::JOB_STATE_QUEUED);
    r->mutable_spec()->mutable_source()->mutable_tree_root()->set_hash("root");
    r->mutable_spec()->set_attr(attr);
    r->mutable_spec()->set_display_name(attr);
    r->mutable_spec()->mutable_requirements()->set_system("x86_64-linux");
    std::string bytes = r->SerializeAsString();
    return graph_.Add(std::move(r), std::move(bytes), clock_.Now());
  }
  const JobRecord& Rec(const std::string& id) { return graph_.Rec(*graph_.Find(id)); }

  testing::FakeClock clock_;
  WorkGraph graph_;
};

TEST_F(WorkGraphTest, IdenticalJobsShareOneItemAndTheRunnerEndsIt) {
  AddJob("1", "a");
  AddJob("2", "a");
  AddJob("3", "b");
  AddJob("4", "a");
  EXPECT_EQ(graph_.Admit("1", Rec("1")).shares_with, "");
  EXPECT_EQ(graph_.Admit("2", Rec("2")).shares_with, "1");
  EXPECT_EQ(graph_.Admit("3", Rec("3")).shares_with, "") << "another attribute is another unit of work";
  EXPECT_EQ(graph_.Admit("4", Rec("4")).shares_with, "1");
  EXPECT_EQ(graph_.RunnerOf("2", Rec("2")), "1");
  EXPECT_EQ(graph_.RunnerOf("1", Rec("1")), "") << "the runner shares with nobody";
  EXPECT_EQ(WorkGraph::SharingReason("1"), "identical to job 1, already in flight: it will share that job's result");

  // A sharing job cancelled on its own stops waiting; the item goes on.
  EXPECT_TRUE(graph_.Leave("4", Rec("4")).waiting.empty());
  EXPECT_EQ(graph_.RunnerOf("4", Rec("4")), "");
  // The runner ends: those still waiting are handed back, and the item is gone.
  EXPECT_EQ(graph_.Leave("1", Rec("1")).waiting, std::vector<std::string>{"2"});
  EXPECT_EQ(graph_.RunnerOf("2", Rec("2")), "");
  // So the next identical job runs a new item.
  AddJob("5", "a");
  EXPECT_EQ(graph_.Admit("5", Rec("5")).shares_with, "");
}

TEST_F(WorkGraphTest, AJobHeldForItsWorkerRunsItsItem) {
  AddJob("1", "a");
  graph_.HoldItem("1", Rec("1"));
  AddJob("2", "a");
  EXPECT_EQ(graph_.Admit("2", Rec("2")).shares_with, "1");
}

TEST_F(WorkGraphTest, RetriesBackOffDoublingUpToFiveMinutesAndStopAtTheAttemptLimit) {
  WorkGraph::Job& job = AddJob("1", "a");
  const absl::Time now = clock_.Now();
  graph_.MarkAssigned(job, "w");
  EXPECT_EQ(graph_.Rec(job).attempt(), 1u);
  EXPECT_EQ(graph_.Rec(job).state(), kiln::v1::JOB_STATE_ASSIGNED);
  EXPECT_EQ(graph_.Requeue(job, "lost", 10, absl::ZeroDuration(), now), absl::InfinitePast()) << "no back-off: at once";
  EXPECT_EQ(graph_.Rec(job).state(), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(graph_.Rec(job).requeue_reason(), "lost");
  EXPECT_EQ(graph_.Requeue(job, "x", 10, absl::Seconds(5), now), now + absl::Seconds(5));
  graph_.MarkAssigned(job, "w");
  EXPECT_EQ(graph_.Requeue(job, "x", 10, absl::Seconds(5), now), now + absl::Seconds(10));
  for (int i = 0; i < 6; ++i) graph_.MarkAssigned(job, "w");
  EXPECT_EQ(graph_.Rec(job).attempt(), 8u);
  EXPECT_EQ(graph_.Requeue(job, "x", 10, absl::Seconds(5), now), now + absl::Minutes(5));
  graph_.MarkAssigned(job, "w");
  graph_.MarkAssigned(job, "w");
  EXPECT_EQ(graph_.Requeue(job, "x", 10, absl::Seconds(5), now), std::nullopt) << "10 attempts: no more";
}

TEST_F(WorkGraphTest, OnlyTheCurrentAttemptOnItsWorkerCounts) {
  WorkGraph::Job& job = AddJob("1", "a");
  graph_.MarkAssigned(job, "w1");
  EXPECT_NE(graph_.FindAttempt("w1", "1", 1), nullptr);
  EXPECT_EQ(graph_.FindAttempt("w2", "1", 1), nullptr);
  EXPECT_EQ(graph_.FindAttempt("w1", "1", 2), nullptr);
  EXPECT_EQ(graph_.FindAttempt("w1", "9", 1), nullptr);
  graph_.End(job, kiln::v1::JOB_STATE_SUCCEEDED, {}, clock_.Now());
  EXPECT_EQ(graph_.FindAttempt("w1", "1", 1), nullptr) << "an ended job takes no more reports";
}

TEST_F(WorkGraphTest, ATokensQuotaCountsItsJobsUntilTheyEnd) {
  WorkGraph::Job& a = AddJob("1", "a", "ci");
  AddJob("2", "b", "ci");
  AddJob("3", "c");
  EXPECT_EQ(graph_.ActiveOf("ci"), 2u);
  graph_.End(a, kiln::v1::JOB_STATE_FAILED, {}, clock_.Now());
  EXPECT_EQ(graph_.ActiveOf("ci"), 1u);
  graph_.End(a, kiln::v1::JOB_STATE_FAILED, {}, clock_.Now());
  EXPECT_EQ(graph_.ActiveOf("ci"), 1u) << "ending twice frees once";
  EXPECT_EQ(graph_.ActiveOf("other"), 0u);
}

TEST_F(WorkGraphTest, ChangedRecordsWaitForTheWriteAndAFailedWriteKeepsThem) {
  WorkGraph::Job& job = AddJob("1", "a");
  WorkGraph::Job& other = AddJob("2", "b");
  EXPECT_FALSE(graph_.has_writes()) << "added jobs were stored by the submission";
  graph_.MarkAssigned(job, "w");
  graph_.End(other, kiln::v1::JOB_STATE_SUCCEEDED, {}, clock_.Now());
  graph_.CacheResult("key", Rec("2"));
  graph_.CacheResult("key", Rec("2"));
  std::vector<std::pair<const std::string*, const std::string*>> packed;
  std::vector<std::pair<std::string, const kiln::state::v1::CachedResult*>> cached;
  graph_.TakeWrites(packed, cached);
  ASSERT_EQ(packed.size(), 2u);
  EXPECT_EQ(cached.size(), 1u) << "one cache entry per key";
  JobRecord stored;
  ASSERT_TRUE(stored.ParseFromString(*packed[0].second));
  EXPECT_EQ(stored.worker(), "w");
  graph_.WriteFailed();
  packed.clear();
  cached.clear();
  graph_.TakeWrites(packed, cached);
  EXPECT_EQ(packed.size(), 2u) << "kept for the next write";
  graph_.Committed();
  EXPECT_FALSE(graph_.has_writes());
  graph_.DropParsed();
  EXPECT_NE(job.parsed, nullptr) << "an assigned job stays parsed: it is worked on";
  EXPECT_EQ(other.parsed, nullptr) << "a finished one keeps only its bytes";
  JobRecord scratch;
  EXPECT_EQ(WorkGraph::View(other, scratch).state(), kiln::v1::JOB_STATE_SUCCEEDED);
}

TEST_F(WorkGraphTest, BuildsetsAreListedNewestFirstWithTheirCounts) {
  AddJob("1", "a", "", "b1");
  WorkGraph::Job& done = AddJob("2", "a", "", "b2");
  AddJob("3", "b", "", "b2");
  graph_.End(done, kiln::v1::JOB_STATE_SUCCEEDED, {}, clock_.Now());
  for (int i = 3; i <= 10; ++i) AddJob(absl::StrCat(i + 1), "c", "", absl::StrCat("b", i));
  kiln::v1::ListBuildsetsResponse list = graph_.ListBuildsets(9);
  ASSERT_EQ(list.buildsets_size(), 9);
  EXPECT_EQ(list.buildsets(0).buildset_id(), "b10") << "b10 after b9, though it sorts before as text";
  EXPECT_EQ(list.buildsets(8).buildset_id(), "b2");
  EXPECT_EQ(list.buildsets(8).targets(), 2u);
  EXPECT_EQ(list.buildsets(8).succeeded(), 1u);
  EXPECT_EQ(list.buildsets(8).unfinished(), 1u);
  EXPECT_FALSE(list.buildsets(8).has_finished_at());
  ASSERT_NE(graph_.BuildsetJobs("b2"), nullptr);
  EXPECT_EQ(*graph_.BuildsetJobs("b2"), (std::vector<std::string>{"2", "3"}));
}

TEST_F(WorkGraphTest, TheResultKeyFollowsTheFlakeAttributeSystemAndPushTarget) {
  kiln::v1::Digest subtree;
  subtree.set_hash("abc");
  kiln::v1::JobSpec spec;
  spec.set_attr("a");
  spec.mutable_requirements()->set_system("x86_64-linux");
  const std::string key = WorkGraph::ResultKey(subtree, spec);
  EXPECT_EQ(key.size(), 64u);
  kiln::v1::JobSpec other_source = spec;
  other_source.mutable_source()->mutable_tree_root()->set_hash("elsewhere in the monorepo");
  EXPECT_EQ(WorkGraph::ResultKey(subtree, other_source), key) << "only the flake's own directory counts";
  kiln::v1::JobSpec pushed = spec;
  pushed.mutable_push()->set_repository("r/x");
  EXPECT_NE(WorkGraph::ResultKey(subtree, pushed), key);
  subtree.set_hash("abd");
  EXPECT_NE(WorkGraph::ResultKey(subtree, spec), key);
}

}  // namespace
}  // namespace kiln
