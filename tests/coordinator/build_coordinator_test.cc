// BuildCoordinator driven step by step, without sockets: fake worker sessions
// and watchers record what the coordinator sends; the state store is the real
// RocksDB one in a temporary directory; time is a FakeClock.
#include "coordinator/build_coordinator.h"

#include <gtest/gtest.h>

#include "common/source_tree.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/coordinator_fakes.h"
#include "tests/support/fake_clock.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;
using kiln::v1::JobEvent;
using kiln::v1::WorkerMessage;
using testing::StatusIs;

// A fake at the StateStore seam: the real store, except that while `full`
// every write fails as on a full disk and it reports no free space.
class FullDiskStore final : public StateStore {
 public:
  explicit FullDiskStore(StateStore* real) : real_(real) {}
  absl::Status Commit(const StateWrite& write) override {
    if (full) return absl::ResourceExhaustedError("state write: IO error: No space left on device");
    return real_->Commit(write);
  }
  absl::Status Resume() override { return real_->Resume(); }
  uint64_t FreeBytes() const override { return full ? 0 : free_bytes; }
  absl::StatusOr<std::string> GetBlob(const std::string& h) override { return real_->GetBlob(h); }
  absl::StatusOr<std::string> GetLog(const std::string& id) override { return real_->GetLog(id); }
  absl::Status ForEachPackedJob(absl::FunctionRef<absl::Status(absl::string_view)> fn) override {
    return real_->ForEachPackedJob(fn);
  }
  absl::StatusOr<StoredCounters> LoadCounters() override { return real_->LoadCounters(); }
  absl::StatusOr<kiln::state::v1::CachedResult> GetCachedResult(const std::string& key) override {
    return real_->GetCachedResult(key);
  }
  bool full = false;
  uint64_t free_bytes = uint64_t{1} << 30;  // While not full.

 private:
  StateStore* real_;
};

class BuildCoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override { Open(); }

  void Open() {
    core_.reset();
    store_.reset();
    auto store = RocksDbStateStore::Open(dir_.path(), false);
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
    core_ = std::make_unique<BuildCoordinator>(store_.get(), &metrics_, &clock_, options_, store_->cas());
    ASSERT_TRUE(core_->Recover().ok());
  }

  static constexpr char kFlake[] = "{ outputs = _: {}; }";

  // A one-file source tree, uploaded with the request.
  kiln::v1::SubmitBuildRequest Request(int targets = 1, const std::string& system = "x86_64-linux") {
    // A new attribute every time: identical jobs in flight are deduplicated
    // (tests of that submit one request twice).
    std::vector<std::string> attrs;
    for (int i = 0; i < targets; ++i) attrs.push_back(absl::StrCat("pkg", next_attr_++));
    kiln::v1::SubmitBuildRequest request = testing::OneFileFlakeSubmission(kFlake, attrs, system);
    for (int i = 0; i < targets; ++i) {
      request.mutable_targets(i)->mutable_spec()->set_display_name(absl::StrCat("target-", i));
    }
    request.set_submitter("test");
    return request;
  }

  std::string SubmitOne() {
    auto response = core_->Submit(Request());
    EXPECT_TRUE(response.ok()) << response.status();
    return response->job_ids(0);
  }

  // Registers a worker; `held` lists the (job, attempt) it still has from an
  // earlier connection.
  std::shared_ptr<testing::FakeWorkerSession> Connect(const std::string& name, int slots,
                                                      std::vector<std::pair<std::string, uint32_t>> held = {}) {
    auto session = std::make_shared<testing::FakeWorkerSession>();
    WorkerMessage reg;
    reg.mutable_register_()->set_name(name);
    reg.mutable_register_()->add_systems("x86_64-linux");
    reg.mutable_register_()->set_max_jobs(slots);
    for (const auto& [job, attempt] : held) {
      auto* r = reg.mutable_register_()->add_running();
      r->set_job_id(job);
      r->set_attempt(attempt);
    }
    core_->OnWorkerMessage(session, reg);
    return session;
  }

  void Heartbeat(const std::shared_ptr<testing::FakeWorkerSession>& session) {
    WorkerMessage heartbeat;
    heartbeat.mutable_heartbeat();
    core_->OnWorkerMessage(session, heartbeat);
  }

  void Report(const std::shared_ptr<testing::FakeWorkerSession>& session, const CoordinatorMessage& assignment,
              kiln::v1::ResultCode code) {
    WorkerMessage finished;
    finished.mutable_finished()->set_job_id(assignment.assign().job_id());
    finished.mutable_finished()->set_attempt(assignment.assign().attempt());
    finished.mutable_finished()->mutable_result()->set_code(code);
    finished.mutable_finished()->mutable_result()->mutable_outputs()->insert({"out", "/nix/store/x-out"});
    core_->OnWorkerMessage(session, finished);
  }

  kiln::v1::JobState State(const std::string& id) { return core_->GetJob(id)->state(); }

  testing::TempDir dir_;
  int next_attr_ = 0;
  testing::FakeClock clock_;
  CoordinatorMetrics metrics_{std::make_shared<prometheus::Registry>()};
  BuildCoordinatorOptions options_;
  std::unique_ptr<RocksDbStateStore> store_;
  std::unique_ptr<BuildCoordinator> core_;
};

TEST_F(BuildCoordinatorTest, AssignsToARegisteredWorkerWithTheSourceAndReportsTheResult) {
  const std::string id = SubmitOne();
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_QUEUED);
  EXPECT_EQ(core_->GetJob(id)->waiting_reason(), "no worker is connected");

  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(id, 0, 0, watcher).ok());
  ASSERT_EQ(watcher->events.size(), 1u);  // Replayed: queued.
  EXPECT_TRUE(watcher->events[0].has_queued());

  auto w = Connect("w1", 1);
  ASSERT_TRUE(w->sent[0].has_registered());
  auto assignments = w->Assignments();
  ASSERT_EQ(assignments.size(), 1u);
  EXPECT_EQ(assignments[0].assign().attempt(), 1u);
  // The whole tree travels with the assignment.
  ASSERT_EQ(assignments[0].assign().blobs_size(), 2);
  std::vector<std::string> sent;
  for (const auto& blob : assignments[0].assign().blobs()) sent.push_back(blob.data());
  EXPECT_THAT(sent, ::testing::Contains(kFlake));
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_ASSIGNED);

  WorkerMessage started;
  started.mutable_started()->set_job_id(id);
  started.mutable_started()->set_attempt(1);
  core_->OnWorkerMessage(w, started);
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_RUNNING);
  clock_.Advance(absl::Seconds(5));
  Report(w, assignments[0], kiln::v1::RESULT_CODE_SUCCEEDED);

  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(core_->GetJob(id)->result().outputs().at("out"), "/nix/store/x-out");
  ASSERT_TRUE(watcher->closed);
  EXPECT_TRUE(watcher->events.back().has_finished());
  // Sequence numbers increase by one: a resuming watcher loses nothing.
  for (size_t i = 0; i < watcher->events.size(); ++i) EXPECT_EQ(watcher->events[i].sequence(), i + 1);
}

// What is not stored is not announced: a result that arrives while state
// writes fail waits (no event, no acknowledgement, so the worker keeps it),
// submissions are refused, and once writes succeed again all of it is
// stored and announced, without a restart.
TEST_F(BuildCoordinatorTest, WhileStateWritesFailNothingIsAnnouncedAndWorkResumesByItself) {
  FullDiskStore disk(store_.get());
  core_ = std::make_unique<BuildCoordinator>(&disk, &metrics_, &clock_, options_, store_->cas());
  ASSERT_TRUE(core_->Recover().ok());
  const std::string id = SubmitOne();
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(id, 0, 0, watcher).ok());
  auto w = Connect("w1", 1);
  auto assignments = w->Assignments();
  ASSERT_EQ(assignments.size(), 1u);

  disk.full = true;
  Report(w, assignments[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_FALSE(core_->state_writable());
  EXPECT_FALSE(watcher->closed);
  for (const auto& e : watcher->events) EXPECT_FALSE(e.has_finished());
  EXPECT_EQ(w->Acks(), 0);
  EXPECT_THAT(core_->Submit(Request()).status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "the coordinator is out of disk space"));
  clock_.Advance(absl::Seconds(2));
  core_->Tick();
  EXPECT_FALSE(watcher->closed);

  disk.full = false;
  clock_.Advance(absl::Seconds(2));
  core_->Tick();
  EXPECT_TRUE(core_->state_writable());
  ASSERT_TRUE(watcher->closed);
  EXPECT_TRUE(watcher->events.back().has_finished());
  EXPECT_EQ(w->Acks(), 1);
  EXPECT_TRUE(core_->Submit(Request()).ok());
  // Stored: a coordinator opened on the store sees it.
  Open();
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_SUCCEEDED);
}

// RocksDB cannot resume, in the running process, after a write of its own
// log failed for lack of space. So the coordinator stops writing before the
// disk is full: below the reserve it takes no new work and holds its state
// changes (writes still succeed), and resumes once space is back.
TEST_F(BuildCoordinatorTest, WritesStopAtTheReserveBeforeTheDiskIsFull) {
  FullDiskStore disk(store_.get());
  core_ = std::make_unique<BuildCoordinator>(&disk, &metrics_, &clock_, options_, store_->cas());
  ASSERT_TRUE(core_->Recover().ok());
  const std::string id = SubmitOne();
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(id, 0, 0, watcher).ok());
  auto w = Connect("w1", 1);
  auto assignments = w->Assignments();
  ASSERT_EQ(assignments.size(), 1u);

  disk.free_bytes = options_.min_free_bytes - 1;
  EXPECT_THAT(core_->Submit(Request()).status(), StatusIs(absl::StatusCode::kResourceExhausted, "below the reserve"));
  EXPECT_FALSE(core_->state_writable());
  Report(w, assignments[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  for (const auto& e : watcher->events) EXPECT_FALSE(e.has_finished()) << "not stored, so not announced";
  EXPECT_EQ(w->Acks(), 0);

  disk.free_bytes = options_.resume_min_free_bytes;
  clock_.Advance(absl::Seconds(2));
  core_->Tick();
  EXPECT_TRUE(core_->state_writable());
  ASSERT_TRUE(watcher->closed);
  EXPECT_TRUE(watcher->events.back().has_finished());
  EXPECT_TRUE(core_->Submit(Request()).ok());
}

TEST_F(BuildCoordinatorTest, ATokensJobsCountAgainstItsQuotaUntilTheyEndAndAcrossARestart) {
  options_.max_active_jobs_per_token = 3;
  Open();
  auto first = core_->Submit(Request(2), "ci");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_THAT(core_->Submit(Request(2), "ci").status(),
              StatusIs(absl::StatusCode::kResourceExhausted, "token 'ci' has 2 job(s) queued or running"));
  // Other tokens and callers without one have their own counts.
  EXPECT_TRUE(core_->Submit(Request(3), "other").ok());
  EXPECT_TRUE(core_->Submit(Request(5)).ok());
  // The stored record names the token, and so does its submitter line.
  auto stored = store_->LoadJobs();
  ASSERT_TRUE(stored.ok());
  bool seen = false;
  for (const auto& record : *stored) {
    if (record.job_id() != first->job_ids(0)) continue;
    seen = true;
    EXPECT_EQ(record.token(), "ci");
    EXPECT_THAT(record.submitter(), ::testing::HasSubstr("(token ci)"));
  }
  EXPECT_TRUE(seen);

  // After a restart the queued jobs still count.
  Open();
  EXPECT_THAT(core_->Submit(Request(2), "ci").status(), StatusIs(absl::StatusCode::kResourceExhausted));
  // A job that ends gives its place back.
  ASSERT_TRUE(core_->Cancel(first->job_ids(0)).ok());
  ASSERT_TRUE(core_->Cancel(first->job_ids(1)).ok());
  EXPECT_TRUE(core_->Submit(Request(3), "ci").ok());
  EXPECT_THAT(core_->Submit(Request(1), "ci").status(), StatusIs(absl::StatusCode::kResourceExhausted));
}

TEST_F(BuildCoordinatorTest, RefusesBadSubmissionsWithoutStoringAnything) {
  auto wrong_blob = Request();
  wrong_blob.mutable_blobs(0)->set_data("not what the digest says");
  EXPECT_THAT(core_->Submit(wrong_blob).status(), StatusIs(absl::StatusCode::kInvalidArgument, "does not match"));
  auto missing = Request();
  missing.mutable_blobs()->DeleteSubrange(0, 1);
  EXPECT_THAT(core_->Submit(missing).status(), StatusIs(absl::StatusCode::kNotFound, "flake.nix"));
  auto archive = Request();
  archive.mutable_targets(0)->mutable_spec()->mutable_source()->mutable_archive()->set_hash(std::string(64, 'a'));
  EXPECT_THAT(core_->Submit(archive).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "source archives are no longer accepted"));
  auto too_big = Request();
  too_big.mutable_blobs(0)->set_data(std::string(options_.max_source_bytes + 1, 'x'));
  EXPECT_THAT(core_->Submit(too_big).status(), StatusIs(absl::StatusCode::kResourceExhausted, "larger than"));
  auto bad_attr = Request();
  bad_attr.mutable_targets(0)->mutable_spec()->set_attr("--option");
  EXPECT_EQ(core_->Submit(bad_attr).status().code(), absl::StatusCode::kInvalidArgument);
  auto escape = Request();
  escape.mutable_targets(0)->mutable_spec()->mutable_source()->set_flake_subdir("../outside");
  EXPECT_EQ(core_->Submit(escape).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(core_->Submit(kiln::v1::SubmitBuildRequest()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(store_->LoadJobs()->empty());
  // A good one after the bad ones gets the first id.
  EXPECT_EQ(SubmitOne(), "1");
}

// `..` and empty components would be normalised by the registry into a
// repository the patterns never saw: refused by the grammar, naming the rule.
TEST_F(BuildCoordinatorTest, PushTargetsAreCheckedOnTheirParsedComponents) {
  options_.push_allow = {"127.0.0.1:5998/team/*"};
  Open();
  const auto with_push = [&](const std::string& repository, const std::string& tag) {
    auto request = Request();
    auto* push = request.mutable_targets(0)->mutable_spec()->mutable_push();
    push->set_repository(repository);
    push->add_tags(tag);
    return core_->Submit(request).status();
  };
  EXPECT_TRUE(with_push("127.0.0.1:5998/team/app", "t").ok());
  EXPECT_THAT(with_push("127.0.0.1:5998/other/app", "t"), StatusIs(absl::StatusCode::kPermissionDenied, "not allowed"));
  EXPECT_THAT(with_push("127.0.0.1:5998/team/../other/app", "escaped"),
              StatusIs(absl::StatusCode::kInvalidArgument, "path component '..' is not allowed"));
  EXPECT_THAT(with_push("127.0.0.1:5998/team//app", "t"),
              StatusIs(absl::StatusCode::kInvalidArgument, "empty path component"));
  EXPECT_THAT(with_push("127.0.0.1:5998/team/app", "-x"), StatusIs(absl::StatusCode::kInvalidArgument, "tag"));
  EXPECT_THAT(with_push("127.0.0.1:5998/team/app", ".x"), StatusIs(absl::StatusCode::kInvalidArgument, "tag"));
  EXPECT_EQ(store_->LoadJobs()->size(), 1u);
}

TEST_F(BuildCoordinatorTest, RefusesWhatNoKnownWorkerCouldBuildOnceTheGraceWindowIsOver) {
  auto w = Connect("w1", 1);
  // Within the grace window after a start, workers may still be coming back.
  auto early = core_->Submit(Request(1, "aarch64-linux"));
  ASSERT_TRUE(early.ok()) << early.status();
  clock_.Advance(options_.capability_grace);
  EXPECT_THAT(core_->Submit(Request(1, "aarch64-linux")).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "target-0: no worker offers system aarch64-linux"));
  // The one submitted early fails too, like a new submission, at the next
  // tick: it would wait forever otherwise.
  EXPECT_EQ(State(early->job_ids(0)), kiln::v1::JOB_STATE_QUEUED);
  core_->Tick();
  EXPECT_EQ(State(early->job_ids(0)), kiln::v1::JOB_STATE_FAILED);
  EXPECT_EQ(core_->GetJob(early->job_ids(0))->result().error_message(),
            "target-0: no worker offers system aarch64-linux");
  // A worker that disconnected still counts: it may come back.
  core_->OnWorkerGone(w.get());
  const std::string later = SubmitOne();
  core_->Tick();
  EXPECT_EQ(core_->GetJob(later)->waiting_reason(), "no worker is connected");
}

TEST_F(BuildCoordinatorTest, ASecondWorkerUnderAConnectedWorkersNameIsRefused) {
  const auto connect = [&](const std::string& instance) {
    auto session = std::make_shared<testing::FakeWorkerSession>();
    WorkerMessage reg;
    reg.mutable_register_()->set_name("w");
    reg.mutable_register_()->set_instance_id(instance);
    reg.mutable_register_()->add_systems("x86_64-linux");
    reg.mutable_register_()->set_max_jobs(1);
    core_->OnWorkerMessage(session, reg);
    return session;
  };
  auto first = connect("process-a");
  ASSERT_FALSE(first->closed);
  // Another process: refused, and the first keeps its stream.
  auto second = connect("process-b");
  EXPECT_TRUE(second->closed);
  EXPECT_EQ(second->close_status.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(absl::StrContains(second->close_status.message(), "a worker named 'w' is connected already"))
      << second->close_status;
  EXPECT_FALSE(first->closed);
  EXPECT_EQ(core_->ListWorkers().workers_size(), 1);
  // The same process reconnecting before its old stream is noticed dead:
  // the new stream replaces the old one.
  auto again = connect("process-a");
  EXPECT_FALSE(again->closed);
  EXPECT_TRUE(first->closed);
  // A process whose stream has been silent for two heartbeat intervals is
  // taken for dead: a new process may take the name.
  clock_.Advance(2 * options_.heartbeat_interval);
  auto replacement = connect("process-c");
  EXPECT_FALSE(replacement->closed);
  EXPECT_TRUE(again->closed);
}

TEST_F(BuildCoordinatorTest, BuildsetTargetsShareOneBuildsetAndSpreadOverSlots) {
  auto response = core_->Submit(Request(3));
  ASSERT_TRUE(response.ok());
  ASSERT_EQ(response->job_ids_size(), 3);
  auto a = Connect("a", 1);
  auto b = Connect("b", 1);
  EXPECT_EQ(a->Assignments().size(), 1u);
  EXPECT_EQ(b->Assignments().size(), 1u);
  EXPECT_EQ(core_->GetJob(response->job_ids(2))->waiting_reason(), "all 2 capable workers are busy");
  Report(a, a->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(a->Assignments().size(), 2u);  // The freed slot takes the third.
}

TEST_F(BuildCoordinatorTest, AWorkerAwayPastItsLeaseLosesItsJobAndStaleResultsAreFenced) {
  const std::string id = SubmitOne();
  auto w1 = Connect("w1", 1);
  const CoordinatorMessage first = w1->Assignments().at(0);
  core_->OnWorkerGone(w1.get());
  // Held for the lease: a short network blip must not throw the build away.
  clock_.Advance(options_.lease - absl::Seconds(1));
  core_->Tick();
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_ASSIGNED);
  auto w2 = Connect("w2", 1);
  EXPECT_TRUE(w2->Assignments().empty());
  clock_.Advance(absl::Seconds(1));
  core_->Tick();
  ASSERT_EQ(w2->Assignments().size(), 1u);
  EXPECT_EQ(w2->Assignments()[0].assign().attempt(), 2u);

  // w1 comes back still holding attempt 1: it is told to stop, and its late
  // report is acknowledged but ignored.
  auto w1_again = Connect("w1", 1, {{id, 1}});
  ASSERT_EQ(w1_again->Sent(&CoordinatorMessage::has_cancel).size(), 1u);
  EXPECT_EQ(w1_again->Sent(&CoordinatorMessage::has_cancel)[0].cancel().attempt(), 1u);
  Report(w1_again, first, kiln::v1::RESULT_CODE_BUILD_FAILED);
  EXPECT_EQ(w1_again->Acks(), 1);
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_ASSIGNED);
  Report(w2, w2->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(w2->Acks(), 1);
}

TEST_F(BuildCoordinatorTest, AWorkerBackWithinItsLeaseKeepsTheJobsItStillHas) {
  auto response = core_->Submit(Request(2));
  ASSERT_TRUE(response.ok());
  const std::string kept = response->job_ids(0), lost = response->job_ids(1);
  auto w = Connect("w", 2);
  ASSERT_EQ(w->Assignments().size(), 2u);
  core_->OnWorkerGone(w.get());
  clock_.Advance(options_.lease / 2);
  core_->Tick();
  EXPECT_EQ(core_->GetJob(kept)->waiting_reason(), "");
  // Back with only one of the two: that one stays, the other runs again.
  auto back = Connect("w", 2, {{kept, 1}});
  EXPECT_TRUE(back->Sent(&CoordinatorMessage::has_cancel).empty());
  ASSERT_EQ(back->Assignments().size(), 1u);
  EXPECT_EQ(back->Assignments()[0].assign().job_id(), lost);
  EXPECT_EQ(back->Assignments()[0].assign().attempt(), 2u);
  Report(back, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);  // Attempt 1 of `kept`.
  EXPECT_EQ(State(kept), kiln::v1::JOB_STATE_SUCCEEDED);
  // Nothing expires later for a worker that came back (and keeps talking).
  clock_.Advance(options_.lease - absl::Seconds(1));
  core_->Tick();
  EXPECT_EQ(State(lost), kiln::v1::JOB_STATE_ASSIGNED);
}

TEST_F(BuildCoordinatorTest, ASilentWorkerIsCutOffAfterTheLease) {
  const std::string id = SubmitOne();
  auto w = Connect("w", 1);
  clock_.Advance(options_.lease / 2);
  Heartbeat(w);  // Renews the lease.
  clock_.Advance(options_.lease / 2);
  core_->Tick();
  EXPECT_FALSE(w->closed);
  clock_.Advance(options_.lease / 2);
  core_->Tick();
  EXPECT_TRUE(w->closed);
  EXPECT_EQ(w->close_status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_QUEUED);
}

// Several workers behind one broken link go silent together: the tick that
// cuts them off handles each once (cutting one off must not end the others
// under the loop's feet) and requeues all their jobs.
TEST_F(BuildCoordinatorTest, SeveralSilentWorkersAreCutOffInOneTick) {
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(SubmitOne());
  std::vector<std::shared_ptr<testing::FakeWorkerSession>> workers;
  for (const char* name : {"a", "b", "c"}) workers.push_back(Connect(name, 1));
  for (const auto& w : workers) ASSERT_EQ(w->Assignments().size(), 1u);
  clock_.Advance(options_.lease + absl::Seconds(1));
  core_->Tick();
  for (const auto& w : workers) {
    EXPECT_TRUE(w->closed);
    EXPECT_EQ(w->close_status.code(), absl::StatusCode::kDeadlineExceeded);
  }
  for (const std::string& id : ids) EXPECT_EQ(State(id), kiln::v1::JOB_STATE_QUEUED);
  // The farm goes on: a new worker gets the requeued jobs.
  auto fresh = Connect("d", 3);
  EXPECT_EQ(fresh->Assignments().size(), 3u);
}

TEST_F(BuildCoordinatorTest, InfraErrorsRetryUpToTheBoundThenFail) {
  const std::string id = SubmitOne();
  auto w = Connect("w", 1);
  for (uint32_t attempt = 1; attempt <= options_.max_attempts; ++attempt) {
    if (attempt > 1) {
      // Each retry waits retry_backoff * 2^(attempt-2) and says so meanwhile.
      const absl::Duration backoff = options_.retry_backoff * (1 << (attempt - 2));
      EXPECT_EQ(w->Assignments().size(), attempt - 1);
      EXPECT_THAT(core_->GetJob(id)->waiting_reason(), ::testing::HasSubstr("retry back-off until "));
      clock_.Advance(backoff - absl::Seconds(1));
      Heartbeat(w);
      core_->Tick();
      EXPECT_EQ(w->Assignments().size(), attempt - 1);
      clock_.Advance(absl::Seconds(1));
      Heartbeat(w);
      core_->Tick();
    }
    auto assignments = w->Assignments();
    ASSERT_EQ(assignments.size(), attempt);
    EXPECT_EQ(assignments.back().assign().attempt(), attempt);
    Report(w, assignments.back(), kiln::v1::RESULT_CODE_INFRA_ERROR);
  }
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_FAILED);
  EXPECT_NE(core_->GetJob(id)->result().error_message().find("gave up after 3 attempts"), std::string::npos);
  // A build failure is the user's, not retried.
  const std::string other = SubmitOne();
  Report(w, w->Assignments().back(), kiln::v1::RESULT_CODE_BUILD_FAILED);
  EXPECT_EQ(State(other), kiln::v1::JOB_STATE_FAILED);
  EXPECT_EQ(w->Assignments().size(), options_.max_attempts + 1);
}

TEST_F(BuildCoordinatorTest, CancelQueuedAndRunningJobs) {
  const std::string queued = SubmitOne();
  EXPECT_EQ(*core_->Cancel(queued), kiln::v1::JOB_STATE_CANCELLED);
  auto w = Connect("w", 1);
  EXPECT_TRUE(w->Assignments().empty());  // Nothing left to run.

  const std::string running = SubmitOne();
  ASSERT_EQ(w->Assignments().size(), 1u);
  EXPECT_EQ(*core_->Cancel(running), kiln::v1::JOB_STATE_CANCELLED);
  EXPECT_TRUE(w->sent.back().has_cancel());
  EXPECT_EQ(w->sent.back().cancel().job_id(), running);
  // The slot frees only when the worker confirms; then the next job goes.
  const std::string next = SubmitOne();
  EXPECT_EQ(w->Assignments().size(), 1u);
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_CANCELLED);
  EXPECT_EQ(State(running), kiln::v1::JOB_STATE_CANCELLED);
  ASSERT_EQ(w->Assignments().size(), 2u);
  EXPECT_EQ(w->Assignments()[1].assign().job_id(), next);
  EXPECT_EQ(core_->Cancel("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(BuildCoordinatorTest, RecoveryKeepsResultsAndHoldsWhatWasRunningForOneLease) {
  const std::string done = SubmitOne();
  auto w = Connect("w", 1);
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  const std::string running = SubmitOne();
  ASSERT_EQ(w->Assignments().size(), 2u);
  const std::string queued = SubmitOne();

  Open();  // A new coordinator on the same state, as after a crash.
  EXPECT_EQ(State(done), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(core_->GetJob(done)->result().outputs().at("out"), "/nix/store/x-out");
  EXPECT_EQ(State(running), kiln::v1::JOB_STATE_ASSIGNED);  // Held for w.
  EXPECT_EQ(State(queued), kiln::v1::JOB_STATE_QUEUED);
  // Ids continue; nothing is reused.
  EXPECT_EQ(SubmitOne(), "4");
  auto w2 = Connect("w2", 4);
  ASSERT_EQ(w2->Assignments().size(), 2u);
  // w does not come back: after the lease its job runs elsewhere, as attempt 2.
  clock_.Advance(options_.lease);
  Heartbeat(w2);
  core_->Tick();
  auto assignments = w2->Assignments();
  ASSERT_EQ(assignments.size(), 3u);
  EXPECT_EQ(assignments[2].assign().job_id(), running);
  EXPECT_EQ(assignments[2].assign().attempt(), 2u);
}

TEST_F(BuildCoordinatorTest, AWatcherFromBeforeARestartIsReplayedEverything) {
  const std::string id = SubmitOne();
  auto before = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(id, 0, 0, before).ok());
  ASSERT_FALSE(before->events.empty());
  const uint64_t old_incarnation = before->events.back().incarnation();
  const uint64_t resume_from = before->events.back().sequence() + 1;
  // Same process: resuming skips what was seen.
  auto same = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(id, resume_from, old_incarnation, same).ok());
  EXPECT_TRUE(same->events.empty());

  Open();
  auto after = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(id, resume_from, old_incarnation, after).ok());
  ASSERT_FALSE(after->events.empty());
  EXPECT_NE(after->events[0].incarnation(), old_incarnation);
  EXPECT_TRUE(after->events[0].has_queued());
}

TEST_F(BuildCoordinatorTest, BuildsetsCanBeReadAndCancelledWhole) {
  auto response = core_->Submit(Request(3));
  ASSERT_TRUE(response.ok());
  auto w = Connect("w", 1);
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  auto buildset = core_->GetBuildset(response->buildset_id());
  ASSERT_TRUE(buildset.ok());
  ASSERT_EQ(buildset->jobs_size(), 3);
  EXPECT_EQ(buildset->jobs(0).state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(buildset->jobs(1).state(), kiln::v1::JOB_STATE_ASSIGNED);
  EXPECT_EQ(buildset->jobs(2).state(), kiln::v1::JOB_STATE_QUEUED);
  auto cancelled = core_->CancelBuildset(response->buildset_id());
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->jobs(0).state(), kiln::v1::JOB_STATE_SUCCEEDED);  // Finished work stays.
  EXPECT_EQ(cancelled->jobs(1).state(), kiln::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(cancelled->jobs(2).state(), kiln::v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(w->Sent(&CoordinatorMessage::has_cancel).size(), 1u);
  EXPECT_THAT(core_->GetBuildset("b99").status(), StatusIs(absl::StatusCode::kNotFound, "no buildset b99"));
  // Kept across a restart.
  Open();
  EXPECT_EQ(core_->GetBuildset(response->buildset_id())->jobs_size(), 3);
}

TEST_F(BuildCoordinatorTest, ADrainedWorkerTakesNothingNewEvenAfterReconnecting) {
  auto w = Connect("w", 2);
  const std::string first = SubmitOne();
  ASSERT_EQ(w->Assignments().size(), 1u);
  auto info = core_->DrainWorker("w", /*undo=*/false);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->state(), kiln::v1::WORKER_STATE_DRAINING);
  EXPECT_EQ(info->running_jobs_size(), 1);
  const std::string second = SubmitOne();
  EXPECT_EQ(w->Assignments().size(), 1u);
  EXPECT_EQ(core_->GetJob(second)->waiting_reason(), "all 1 capable workers are draining");
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);  // Running work finishes.
  EXPECT_EQ(State(first), kiln::v1::JOB_STATE_SUCCEEDED);
  core_->OnWorkerGone(w.get());
  auto back = Connect("w", 2);
  EXPECT_TRUE(back->Assignments().empty());
  EXPECT_EQ(core_->ListWorkers().workers(0).state(), kiln::v1::WORKER_STATE_DRAINING);
  ASSERT_TRUE(core_->DrainWorker("w", /*undo=*/true).ok());
  EXPECT_EQ(back->Assignments().size(), 1u);
  EXPECT_THAT(core_->DrainWorker("nobody", false).status(), StatusIs(absl::StatusCode::kNotFound, "nobody"));
}

TEST_F(BuildCoordinatorTest, HeartbeatsOverALimitStopNewAssignmentsUntilTheWorkerRecovers) {
  auto w = Connect("w", 2);
  WorkerMessage low_disk;
  low_disk.mutable_heartbeat()->set_store_free_bytes(int64_t{200} << 20);
  low_disk.mutable_heartbeat()->set_memory_used_fraction(0.5);
  core_->OnWorkerMessage(w, low_disk);
  const std::string id = SubmitOne();
  EXPECT_TRUE(w->Assignments().empty());
  EXPECT_EQ(core_->GetJob(id)->waiting_reason(),
            "all 1 capable workers are over their limits (w: 0.2 GiB free on its Nix store, below 1.0 GiB)");
  EXPECT_EQ(core_->ListWorkers().workers(0).over_limit(), "0.2 GiB free on its Nix store, below 1.0 GiB");
  WorkerMessage low_work_dir;
  low_work_dir.mutable_heartbeat()->set_store_free_bytes(int64_t{50} << 30);
  low_work_dir.mutable_heartbeat()->set_work_dir_free_bytes(int64_t{100} << 20);
  core_->OnWorkerMessage(w, low_work_dir);
  EXPECT_THAT(core_->GetJob(id)->waiting_reason(),
              ::testing::HasSubstr("0.1 GiB free on its work directory, below 0.5 GiB"));
  EXPECT_EQ(core_->ListWorkers().workers(0).work_dir_free_bytes(), int64_t{100} << 20);
  WorkerMessage full_memory;
  full_memory.mutable_heartbeat()->set_store_free_bytes(int64_t{50} << 30);
  full_memory.mutable_heartbeat()->set_memory_used_fraction(0.99);
  core_->OnWorkerMessage(w, full_memory);
  EXPECT_THAT(core_->GetJob(id)->waiting_reason(), ::testing::HasSubstr("memory 99% used, above 95%"));
  WorkerMessage fine;
  fine.mutable_heartbeat()->set_store_free_bytes(int64_t{50} << 30);
  fine.mutable_heartbeat()->set_memory_used_fraction(0.5);
  core_->OnWorkerMessage(w, fine);
  EXPECT_EQ(w->Assignments().size(), 1u);
  EXPECT_EQ(core_->ListWorkers().workers(0).store_free_bytes(), int64_t{50} << 30);
}

TEST_F(BuildCoordinatorTest, IdenticalJobsInFlightRunOnceAndShareTheResult) {
  const auto request = Request();
  const std::string leader = core_->Submit(request)->job_ids(0);
  const std::string follower = core_->Submit(request)->job_ids(0);  // Same tree, attribute, system.
  auto different = core_->Submit(Request());
  ASSERT_TRUE(different.ok());
  EXPECT_EQ(core_->GetJob(follower)->waiting_reason(),
            absl::StrCat("identical to job ", leader, ", already in flight: it will share that job's result"));
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(follower, 0, 0, watcher).ok());

  auto w = Connect("w", 4);
  auto assignments = w->Assignments();
  ASSERT_EQ(assignments.size(), 2u);  // The leader and the different one; not the follower.
  EXPECT_EQ(assignments[0].assign().job_id(), leader);
  EXPECT_EQ(assignments[1].assign().job_id(), different->job_ids(0));
  Report(w, assignments[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(State(follower), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(core_->GetJob(follower)->result().outputs().at("out"), "/nix/store/x-out");
  EXPECT_EQ(core_->GetJob(follower)->worker(), "w");
  ASSERT_FALSE(watcher->events.empty());
  EXPECT_TRUE(watcher->events.back().has_finished());
  EXPECT_TRUE(watcher->closed);
  // Once the leader is done, an identical submission is answered from the
  // result cache; asked to rebuild, it runs again.
  const std::string cached = core_->Submit(request)->job_ids(0);
  EXPECT_TRUE(core_->GetJob(cached)->result().cached());
  auto rebuild = request;
  rebuild.mutable_targets(0)->mutable_spec()->set_rebuild(true);
  const std::string again = core_->Submit(rebuild)->job_ids(0);
  EXPECT_EQ(w->Assignments().back().assign().job_id(), again);
}

TEST_F(BuildCoordinatorTest, CancellingADeduplicatedJobLeavesTheOtherToRun) {
  const auto request = Request();
  const std::string leader = core_->Submit(request)->job_ids(0);
  const std::string follower = core_->Submit(request)->job_ids(0);
  const std::string third = core_->Submit(request)->job_ids(0);
  EXPECT_EQ(*core_->Cancel(leader), kiln::v1::JOB_STATE_CANCELLED);
  // The first follower leads now; the third follows it.
  EXPECT_EQ(core_->GetJob(follower)->waiting_reason(), "no worker is connected");
  EXPECT_THAT(core_->GetJob(third)->waiting_reason(), ::testing::HasSubstr("identical to job " + follower));
  EXPECT_EQ(*core_->Cancel(third), kiln::v1::JOB_STATE_CANCELLED);  // A follower leaves alone.
  auto w = Connect("w", 2);
  ASSERT_EQ(w->Assignments().size(), 1u);
  EXPECT_EQ(w->Assignments()[0].assign().job_id(), follower);
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(State(follower), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(State(third), kiln::v1::JOB_STATE_CANCELLED);
}

TEST_F(BuildCoordinatorTest, PriorityClassesGoByTheOperatorsNames) {
  auto named = Request();
  named.mutable_targets(0)->mutable_spec()->set_priority_class("batch");
  auto accepted = core_->Submit(named);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  EXPECT_EQ(core_->GetJob(accepted->job_ids(0))->spec().priority(), kiln::v1::PRIORITY_BATCH);
  auto unknown = Request();
  unknown.mutable_targets(0)->mutable_spec()->set_priority_class("urgent");
  EXPECT_THAT(core_->Submit(unknown).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "unknown priority class 'urgent'; this coordinator has: interactive, ci, batch"));

  options_.priority_names = {"now", "soon", "whenever"};
  Open();
  auto renamed = Request();
  renamed.mutable_targets(0)->mutable_spec()->set_priority_class("now");
  accepted = core_->Submit(renamed);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  EXPECT_EQ(core_->GetJob(accepted->job_ids(0))->spec().priority(), kiln::v1::PRIORITY_INTERACTIVE);
}

TEST_F(BuildCoordinatorTest, AResultsAcknowledgementRidesOnTheWorkersNextJob) {
  const std::string first = SubmitOne();
  const std::string second = SubmitOne();
  auto w = Connect("w", 1);
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  // One message: the next assignment, carrying the acknowledgement.
  ASSERT_EQ(w->Assignments().size(), 2u);
  const CoordinatorMessage next = w->Assignments()[1];
  EXPECT_EQ(next.assign().job_id(), second);
  ASSERT_EQ(next.acks_size(), 1);
  EXPECT_EQ(next.acks(0).job_id(), first);
  EXPECT_EQ(next.acks(0).attempt(), 1u);
  // With nothing left to run, it goes alone.
  const size_t before = w->sent.size();
  Report(w, w->Assignments()[1], kiln::v1::RESULT_CODE_SUCCEEDED);
  ASSERT_EQ(w->sent.size(), before + 1);
  EXPECT_EQ(w->sent.back().kind_case(), CoordinatorMessage::KIND_NOT_SET);
  EXPECT_EQ(w->sent.back().acks(0).job_id(), second);
}

TEST_F(BuildCoordinatorTest, AfterARestartAReturningWorkerReattachesItsJob) {
  const std::string id = SubmitOne();
  auto w = Connect("w", 1);
  ASSERT_EQ(w->Assignments().size(), 1u);
  Open();
  auto back = Connect("w", 1, {{id, 1}});
  EXPECT_TRUE(back->Assignments().empty());  // Nothing new: its slot is in use.
  Report(back, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(State(id), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(core_->GetJob(id)->result().outputs().at("out"), "/nix/store/x-out");
}

TEST_F(BuildCoordinatorTest, WorkerProtocolViolationsCloseTheStream) {
  auto session = std::make_shared<testing::FakeWorkerSession>();
  WorkerMessage heartbeat;
  heartbeat.mutable_heartbeat();
  core_->OnWorkerMessage(session, heartbeat);
  EXPECT_TRUE(session->closed);
  EXPECT_EQ(session->close_status.code(), absl::StatusCode::kFailedPrecondition);

  auto no_slots = std::make_shared<testing::FakeWorkerSession>();
  WorkerMessage reg;
  reg.mutable_register_()->set_name("w");
  reg.mutable_register_()->add_systems("x86_64-linux");
  reg.mutable_register_()->set_max_jobs(0);
  core_->OnWorkerMessage(no_slots, reg);
  EXPECT_TRUE(no_slots->closed);
  EXPECT_EQ(no_slots->close_status.code(), absl::StatusCode::kInvalidArgument);

  // A second stream with the name of a live one (and no instance id to say
  // it is the same process) is refused; the first keeps going.
  auto first = Connect("same", 1);
  auto second = Connect("same", 1);
  EXPECT_FALSE(first->closed);
  EXPECT_TRUE(second->closed);
}

TEST_F(BuildCoordinatorTest, BatchedCallsShareOneWriteAndAreAnnouncedOnlyAfterIt) {
  core_->set_batched(true);
  auto response = core_->Submit(Request(4));
  ASSERT_TRUE(response.ok()) << response.status();
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(response->job_ids(0), 0, 0, watcher).ok());
  auto w = Connect("w", 4);
  // Nothing leaves before the flush: not the registration reply, not an
  // assignment, not an event.
  EXPECT_TRUE(w->sent.empty());
  const size_t events_before = watcher->events.size();
  core_->Flush();
  ASSERT_EQ(w->sent.size(), 2u);
  EXPECT_TRUE(w->sent[0].has_registered());
  // The four assignments of one round travel in one message.
  EXPECT_TRUE(w->sent[1].has_assign());
  EXPECT_EQ(w->sent[1].assignments_size(), 3);
  ASSERT_EQ(w->Assignments().size(), 4u);
  EXPECT_GT(watcher->events.size(), events_before);
  EXPECT_EQ(watcher->events.back().kind_case(), JobEvent::kAssigned);
  auto stored = store_->LoadJobs();
  ASSERT_TRUE(stored.ok());
  for (const auto& r : *stored) EXPECT_EQ(r.state(), kiln::v1::JOB_STATE_ASSIGNED) << r.job_id();

  // Four results in one message: stored in one write, acknowledged together.
  WorkerMessage finished;
  for (const auto& a : w->Assignments()) {
    kiln::v1::JobFinished* f = finished.has_finished() ? finished.add_results() : finished.mutable_finished();
    f->set_job_id(a.assign().job_id());
    f->set_attempt(a.assign().attempt());
    f->mutable_result()->set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  }
  core_->OnWorkerMessage(w, finished);
  const size_t events_now = watcher->events.size();
  EXPECT_FALSE(watcher->closed);
  stored = store_->LoadJobs();
  ASSERT_TRUE(stored.ok());
  for (const auto& r : *stored) EXPECT_EQ(r.state(), kiln::v1::JOB_STATE_ASSIGNED) << "stored before the flush";
  EXPECT_EQ(w->Acks(), 0);
  core_->Flush();
  EXPECT_EQ(w->Acks(), 4);
  EXPECT_EQ(watcher->events.size(), events_now + 1);
  EXPECT_EQ(watcher->events.back().kind_case(), JobEvent::kFinished);
  EXPECT_TRUE(watcher->closed);
  stored = store_->LoadJobs();
  ASSERT_TRUE(stored.ok());
  for (const auto& r : *stored) EXPECT_EQ(r.state(), kiln::v1::JOB_STATE_SUCCEEDED) << r.job_id();
}

TEST_F(BuildCoordinatorTest, LateWatchersReplayLogsOfRecentJobsOnlyAndWithinTheCap) {
  options_.finished_jobs_with_logs = 1;
  options_.log_bytes_per_job = 400;
  Open();
  const std::string first = SubmitOne();
  const std::string second = SubmitOne();
  auto w = Connect("w", 2);
  const auto assignments = w->Assignments();
  ASSERT_EQ(assignments.size(), 2u);
  auto live = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(first, 0, 0, live).ok());
  // Twenty log messages of ~40 bytes: more than the 400-byte cap.
  for (const auto& a : assignments) {
    for (int i = 0; i < 20; ++i) {
      WorkerMessage log;
      log.mutable_log()->set_job_id(a.assign().job_id());
      log.mutable_log()->set_attempt(a.assign().attempt());
      log.mutable_log()->add_lines()->set_text(absl::StrCat("line ", i, " of job ", a.assign().job_id()));
      core_->OnWorkerMessage(w, log);
    }
  }
  const auto logs = [](const std::vector<JobEvent>& events) {
    int n = 0;
    for (const auto& e : events) n += e.has_log() ? 1 : 0;
    return n;
  };
  const auto replay = [&](const std::string& id) {
    auto late = std::make_shared<testing::FakeJobWatcher>();
    EXPECT_TRUE(core_->Watch(id, 0, 0, late).ok());
    return late->events;
  };
  EXPECT_EQ(logs(live->events), 20);  // Live watchers get every line.
  std::vector<JobEvent> replayed = replay(first);
  const int kept = logs(replayed);
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, 20);  // A late one gets what fits in the cap.
  for (const auto& e : replayed) {
    EXPECT_EQ(e.job_id(), first);
    EXPECT_NE(e.incarnation(), 0u);
  }

  Report(w, assignments[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(logs(replay(assignments[0].assign().job_id())), kept);  // Still the most recent finished job.
  Report(w, assignments[1], kiln::v1::RESULT_CODE_SUCCEEDED);
  // Only the most recent finished job keeps its log; the other keeps every
  // other event, in order.
  replayed = replay(assignments[0].assign().job_id());
  EXPECT_EQ(logs(replayed), 0);
  ASSERT_FALSE(replayed.empty());
  EXPECT_TRUE(replayed.front().has_queued());
  EXPECT_TRUE(replayed.back().has_finished());
  for (size_t i = 1; i < replayed.size(); ++i) EXPECT_GT(replayed[i].sequence(), replayed[i - 1].sequence());
  EXPECT_EQ(logs(replay(assignments[1].assign().job_id())), kept);
  EXPECT_EQ(second, assignments[1].assign().job_id());
}

TEST_F(BuildCoordinatorTest, ATreeUploadedToTheCasIsSubmittedByItsRootAlone) {
  options_.inline_source_bytes = 0;  // Assignments carry directories only.
  Open();
  // The request's tree, uploaded to the CAS instead of sent inline.
  kiln::v1::SubmitBuildRequest request = Request();
  const kiln::v1::Digest root = request.targets(0).spec().source().tree_root();
  auto missing = request;
  missing.clear_blobs();
  EXPECT_THAT(core_->Submit(missing).status(),
              StatusIs(absl::StatusCode::kNotFound, "is neither uploaded nor sent with the submission"));
  // Files first, then the root directory (the CAS takes it only then).
  for (const bool directories : {false, true}) {
    for (const auto& blob : request.blobs()) {
      if ((blob.digest().hash() == root.hash()) == directories) {
        ASSERT_TRUE(store_->cas()->Put(blob.digest(), blob.data(), directories).ok());
      }
    }
  }
  auto accepted = core_->Submit(missing);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  auto w = Connect("w", 1);
  ASSERT_EQ(w->Assignments().size(), 1u);
  // Only the root directory travels; the worker fetches flake.nix itself.
  const kiln::v1::Assignment assign = w->Assignments()[0].assign();
  ASSERT_EQ(assign.blobs_size(), 1);
  EXPECT_EQ(assign.blobs(0).digest().hash(), root.hash());

  // A tree whose link leaves it is refused at submission, by its summary.
  kiln::v1::Directory escaping;
  auto* link = escaping.add_symlinks();
  link->set_name("secrets");
  link->set_target("../../etc");
  const std::string blob = SerializeDirectory(escaping);
  ASSERT_TRUE(store_->cas()->Put(DigestOf(blob), blob, true).ok());
  auto bad = missing;
  *bad.mutable_targets(0)->mutable_spec()->mutable_source()->mutable_tree_root() = DigestOf(blob);
  EXPECT_THAT(core_->Submit(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument, "points outside"));
}

// A two-service monorepo tree: services/a and services/b, each a flake.
kiln::v1::SubmitBuildRequest MonorepoRequest(const std::string& b_content) {
  kiln::v1::SubmitBuildRequest request;
  const auto add = [&](const std::string& data) {
    auto* blob = request.add_blobs();
    *blob->mutable_digest() = DigestOf(data);
    blob->set_data(data);
    return DigestOf(data);
  };
  const auto flake_dir = [&](const std::string& content) {
    kiln::v1::Directory d;
    auto* f = d.add_files();
    f->set_name("flake.nix");
    *f->mutable_digest() = add(content);
    return add(SerializeDirectory(d));
  };
  kiln::v1::Directory services;
  auto* a = services.add_directories();
  a->set_name("a");
  *a->mutable_digest() = flake_dir("{ a }");
  auto* b = services.add_directories();
  b->set_name("b");
  *b->mutable_digest() = flake_dir(b_content);
  kiln::v1::Directory root;
  auto* sv = root.add_directories();
  sv->set_name("services");
  *sv->mutable_digest() = add(SerializeDirectory(services));
  const kiln::v1::Digest root_digest = add(SerializeDirectory(root));
  for (const char* name : {"a", "b"}) {
    auto* spec = request.add_targets()->mutable_spec();
    *spec->mutable_source()->mutable_tree_root() = root_digest;
    spec->mutable_source()->set_flake_subdir(absl::StrCat("services/", name));
    spec->set_attr("default");
    spec->mutable_requirements()->set_system("x86_64-linux");
    spec->set_display_name(name);
  }
  request.set_submitter("test");
  return request;
}

TEST_F(BuildCoordinatorTest, TheResultCacheAnswersUnchangedTargetsAndOnlyThose) {
  auto first = core_->Submit(MonorepoRequest("{ b }"));
  ASSERT_TRUE(first.ok()) << first.status();
  auto w = Connect("w", 2);
  for (const auto& a : w->Assignments()) Report(w, a, kiln::v1::RESULT_CODE_SUCCEEDED);
  ASSERT_EQ(State(first->job_ids(0)), kiln::v1::JOB_STATE_SUCCEEDED);

  // Restarted, and b changed: a is answered from the cache, b builds.
  Open();
  w = Connect("w", 2);
  auto second = core_->Submit(MonorepoRequest("{ b, edited }"));
  ASSERT_TRUE(second.ok());
  auto a = core_->GetJob(second->job_ids(0));
  EXPECT_EQ(a->state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(a->result().cached());
  EXPECT_EQ(a->result().cached_from_job(), first->job_ids(0));
  EXPECT_EQ(a->result().outputs().at("out"), "/nix/store/x-out");
  EXPECT_EQ(a->worker(), "w");
  EXPECT_NE(State(second->job_ids(1)), kiln::v1::JOB_STATE_SUCCEEDED);
  ASSERT_EQ(w->Assignments().size(), 1u);
  EXPECT_EQ(w->Assignments()[0].assign().job_id(), second->job_ids(1));
  // A watcher of the cached job gets its end at once.
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  ASSERT_TRUE(core_->Watch(second->job_ids(0), 0, 0, watcher).ok());
  EXPECT_TRUE(watcher->closed);
  ASSERT_FALSE(watcher->events.empty());
  EXPECT_TRUE(watcher->events.back().finished().result().cached());

  // A result whose outputs are not in the CAS cannot serve --out-link.
  auto wants_outputs = MonorepoRequest("{ b }");
  wants_outputs.mutable_targets(0)->mutable_spec()->set_fetch_outputs(true);
  auto fetching = core_->Submit(wants_outputs);
  ASSERT_TRUE(fetching.ok());
  EXPECT_FALSE(core_->GetJob(fetching->job_ids(0))->result().cached());
  EXPECT_TRUE(core_->GetJob(fetching->job_ids(1))->result().cached());
  ASSERT_TRUE(core_->Cancel(fetching->job_ids(0)).ok());

  // --rebuild bypasses it.
  auto again = MonorepoRequest("{ b }");
  again.mutable_targets(0)->mutable_spec()->set_rebuild(true);
  auto third = core_->Submit(again);
  ASSERT_TRUE(third.ok());
  EXPECT_FALSE(core_->GetJob(third->job_ids(0))->result().cached());
  EXPECT_NE(State(third->job_ids(0)), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(core_->GetJob(third->job_ids(1))->result().cached());  // b as first built.
  EXPECT_EQ(metrics_.ResultCacheLookups("hit").Value(), 3);
  EXPECT_EQ(metrics_.ResultCacheLookups("bypassed").Value(), 1);

  // A failure is not cached.
  for (const auto& a : w->Assignments()) Report(w, a, kiln::v1::RESULT_CODE_SUCCEEDED);  // Free both slots.
  auto failing = MonorepoRequest("{ b, fails }");
  auto fourth = core_->Submit(failing);
  ASSERT_TRUE(fourth.ok());
  const auto assigned = w->Assignments().back();
  ASSERT_EQ(assigned.assign().job_id(), fourth->job_ids(1));
  Report(w, assigned, kiln::v1::RESULT_CODE_BUILD_FAILED);
  ASSERT_EQ(State(fourth->job_ids(1)), kiln::v1::JOB_STATE_FAILED);
  auto fifth = core_->Submit(failing);
  ASSERT_TRUE(fifth.ok());
  EXPECT_FALSE(core_->GetJob(fifth->job_ids(1))->result().cached());
  EXPECT_EQ(w->Assignments().back().assign().job_id(), fifth->job_ids(1));  // It builds again.
}

TEST_F(BuildCoordinatorTest, GarbageCollectionNeverTakesWhatAQueuedOrRunningJobNeeds) {
  options_.cas_gc_grace = -absl::Hours(1);  // Every blob counts as old.
  options_.cas_max_bytes = 1;               // Always over the limit.
  Open();
  kiln::v1::SubmitBuildRequest request = Request();
  const kiln::v1::Digest root = request.targets(0).spec().source().tree_root();
  auto accepted = core_->Submit(request);  // Its tree goes into the CAS.
  ASSERT_TRUE(accepted.ok());
  // Unrelated blobs: a file, and a directory naming it.
  const std::string junk(5000, 'j');
  ASSERT_TRUE(store_->cas()->Put(DigestOf(junk), junk, false).ok());
  kiln::v1::Directory holder;
  auto* f = holder.add_files();
  f->set_name("junk");
  *f->mutable_digest() = DigestOf(junk);
  const std::string holder_blob = SerializeDirectory(holder);
  ASSERT_TRUE(store_->cas()->Put(DigestOf(holder_blob), holder_blob, true).ok());

  auto freed = core_->CollectGarbage();
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_GE(*freed, junk.size());
  EXPECT_FALSE(store_->cas()->HasFile(DigestOf(junk)));
  EXPECT_FALSE(store_->cas()->HasDirectory(DigestOf(holder_blob)));
  EXPECT_TRUE(store_->cas()->HasDirectory(root));  // The queued job's tree stays whole.
  for (const auto& blob : request.blobs()) EXPECT_TRUE(store_->cas()->HasFile(blob.digest()));

  // Running: still kept.
  auto w = Connect("w", 1);
  ASSERT_EQ(w->Assignments().size(), 1u);
  ASSERT_TRUE(core_->CollectGarbage().ok());
  EXPECT_TRUE(store_->cas()->HasDirectory(root));
  // Finished: nothing needs it any more.
  Report(w, w->Assignments()[0], kiln::v1::RESULT_CODE_SUCCEEDED);
  ASSERT_TRUE(core_->CollectGarbage().ok());
  EXPECT_FALSE(store_->cas()->HasDirectory(root));
  EXPECT_EQ(store_->cas()->total_bytes(), 0u);

  // Within the grace period nothing is collected, even over the limit.
  ASSERT_TRUE(store_->cas()->Put(DigestOf(junk), junk, false).ok());
  options_.cas_gc_grace = absl::Hours(1);
  Open();
  EXPECT_EQ(store_->cas()->total_bytes(), junk.size());  // Summed again at start.
  ASSERT_TRUE(core_->CollectGarbage().ok());
  EXPECT_TRUE(store_->cas()->HasFile(DigestOf(junk)));
}

}  // namespace
}  // namespace kiln
