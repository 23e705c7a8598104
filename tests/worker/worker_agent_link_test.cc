// WorkerAgent through a fake CoordinatorLink: the coordinator's side is
// scripted (what it says, when the stream breaks, how the log call answers)
// and time is a FakeClock, so reconnects, the lease rule and the order of
// logs and results are checked without a coordinator. (With a real one over
// gRPC: worker_agent_test.cc.)
#include <gtest/gtest.h>

#include <deque>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "prometheus/registry.h"
#include "tests/support/fake_clock.h"
#include "tests/support/test_util.h"
#include "worker/worker_agent.h"

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;
using kiln::v1::WorkerMessage;

// Waits (at most 10 s of real time) for `done`, checked every 5 ms.
bool Eventually(const std::function<bool()>& done) {
  for (int i = 0; i < 2000; ++i) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return done();
}

// A fake link. Each Connect opens a stream the test drives (Deliver, End);
// with `refuse` set, a stream ends at once (the coordinator unreachable).
// The log call answers `log_answer` at once, or, with `hold_logs`, waits
// for ReleaseLogs (or its cancel).
class FakeCoordinatorLink final : public CoordinatorLink {
 public:
  class Stream final : public ControlStream {
   public:
    Stream(FakeCoordinatorLink* link, ControlStreamHandlers handlers) : link_(link), handlers_(std::move(handlers)) {}
    bool Send(WorkerMessage message, bool droppable) override {
      absl::MutexLock lock(&link_->mu_);
      if (ended_) return false;
      link_->sent_.push_back(std::move(message));
      return true;
    }
    void Cancel() override { End(absl::CancelledError("cancelled by the worker")); }
    void Deliver(CoordinatorMessage m) { handlers_.on_message(std::move(m)); }
    void End(absl::Status status) {
      {
        absl::MutexLock lock(&link_->mu_);
        if (ended_) return;
        ended_ = true;
      }
      handlers_.on_done(std::move(status));
    }

   private:
    FakeCoordinatorLink* const link_;
    ControlStreamHandlers handlers_;
    bool ended_ = false;  // Guarded by link_->mu_.
  };

  std::shared_ptr<ControlStream> Connect(WorkerMessage first, ControlStreamHandlers handlers) override {
    auto stream = std::make_shared<Stream>(this, std::move(handlers));
    bool refuse;
    {
      absl::MutexLock lock(&mu_);
      registrations_.push_back(first.register_());
      refuse = refuse_;
      if (!refuse) streams_.push_back(stream);
    }
    if (refuse) stream->End(absl::UnavailableError("connection refused"));
    return stream;
  }

  std::shared_ptr<PendingCall> SendLogs(kiln::v1::LogBatch batch,
                                        absl::AnyInvocable<void(absl::Status)> done) override {
    auto call = std::make_shared<HeldCall>();
    call->done = std::move(done);
    absl::Status answer;
    {
      absl::MutexLock lock(&mu_);
      batches_.push_back(std::move(batch));
      if (hold_logs_) {
        held_.push_back(call);
        return call;
      }
      answer = log_answer_;
    }
    call->Finish(answer);
    return call;
  }

  kiln::v1::CasService::Stub* cas() override { return nullptr; }

  // The test's side.
  std::shared_ptr<Stream> Latest() {
    absl::MutexLock lock(&mu_);
    return streams_.empty() ? nullptr : streams_.back();
  }
  size_t Connects() {
    absl::MutexLock lock(&mu_);
    return registrations_.size();
  }
  kiln::v1::Register RegistrationNumber(size_t i) {
    absl::MutexLock lock(&mu_);
    return registrations_.at(i);
  }
  std::vector<WorkerMessage> Sent() {
    absl::MutexLock lock(&mu_);
    return sent_;
  }
  size_t LogCalls() {
    absl::MutexLock lock(&mu_);
    return batches_.size();
  }
  void SetRefuse(bool refuse) {
    absl::MutexLock lock(&mu_);
    refuse_ = refuse;
  }
  void SetLogAnswer(absl::Status status) {
    absl::MutexLock lock(&mu_);
    log_answer_ = std::move(status);
  }
  void SetHoldLogs(bool hold) {
    absl::MutexLock lock(&mu_);
    hold_logs_ = hold;
  }
  void ReleaseLogs() {
    std::vector<std::shared_ptr<HeldCall>> held;
    {
      absl::MutexLock lock(&mu_);
      held.swap(held_);
    }
    for (auto& call : held) call->Finish(absl::OkStatus());
  }

 private:
  struct HeldCall final : PendingCall {
    void Cancel() override { Finish(absl::CancelledError("cancelled")); }
    void Finish(absl::Status status) {
      absl::AnyInvocable<void(absl::Status)> run;
      {
        absl::MutexLock lock(&mu);
        run = std::move(done);
        done = nullptr;
      }
      if (run) run(std::move(status));
    }
    absl::Mutex mu;
    absl::AnyInvocable<void(absl::Status)> done;
  };

  absl::Mutex mu_;
  std::vector<kiln::v1::Register> registrations_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Stream>> streams_ ABSL_GUARDED_BY(mu_);
  std::vector<WorkerMessage> sent_ ABSL_GUARDED_BY(mu_);
  std::vector<kiln::v1::LogBatch> batches_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<HeldCall>> held_ ABSL_GUARDED_BY(mu_);
  bool refuse_ ABSL_GUARDED_BY(mu_) = false;
  bool hold_logs_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status log_answer_ ABSL_GUARDED_BY(mu_);
};

// A fake executor: builds run until the test ends them; a cancel ends one
// (cancelled) on a thread of its own, as the real executor's result comes.
class FakeBuildExecutor final : public BuildExecutor {
 public:
  ~FakeBuildExecutor() override {
    for (std::thread& t : threads_) t.join();
  }
  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override {
    absl::MutexLock lock(&mu_);
    const BuildId id = next_++;
    builds_[id] = {request.job_id, std::move(on_line), std::move(on_done)};
    return id;
  }
  void Cancel(BuildId id) override {
    absl::MutexLock lock(&mu_);
    cancelled_.push_back(id);
    threads_.emplace_back([this, id] {
      kiln::v1::BuildResult r;
      r.set_code(kiln::v1::RESULT_CODE_CANCELLED);
      Finish(id, r);
    });
  }
  size_t Started() {
    absl::MutexLock lock(&mu_);
    return builds_.size();
  }
  size_t Cancelled() {
    absl::MutexLock lock(&mu_);
    return cancelled_.size();
  }
  void Line(BuildId id, const std::string& text) {
    kiln::v1::LogLine line;
    line.set_text(text);
    absl::MutexLock lock(&mu_);
    builds_[id].on_line(std::move(line));
  }
  void Finish(BuildId id, kiln::v1::BuildResult result) {
    DoneCallback done;
    {
      absl::MutexLock lock(&mu_);
      done = std::move(builds_[id].on_done);
      builds_[id].on_done = nullptr;
    }
    if (done) std::move(done)(std::move(result));
  }

 private:
  struct Build {
    std::string job_id;
    LineCallback on_line;
    DoneCallback on_done;
  };
  absl::Mutex mu_;
  std::map<BuildId, Build> builds_ ABSL_GUARDED_BY(mu_);
  std::vector<BuildId> cancelled_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  BuildId next_ ABSL_GUARDED_BY(mu_) = 1;
};

class WorkerAgentLinkTest : public ::testing::Test {
 protected:
  WorkerAgentLinkTest() : metrics_(std::make_shared<prometheus::Registry>()) {
    options_.name = "w1";
    options_.work_dir = dir_.path();
    options_.max_jobs = 2;
    options_.systems = {"x86_64-linux"};
    options_.min_backoff = absl::Milliseconds(5);
    options_.max_backoff = absl::Milliseconds(20);
    options_.log_flush_interval = absl::Milliseconds(10);
    options_.clock = &clock_;
    options_.jitter_seed = 1;
  }

  void StartRegistered(absl::Duration lease = absl::Seconds(60)) {
    agent_ = std::make_unique<WorkerAgent>(options_, &link_, &executor_, &metrics_);
    agent_->Start();
    ASSERT_TRUE(Eventually([&] { return link_.Latest() != nullptr; }));
    CoordinatorMessage registered;
    registered.mutable_registered()->set_worker_id("w1");
    registered.mutable_registered()->mutable_lease()->set_seconds(absl::ToInt64Seconds(lease));
    link_.Latest()->Deliver(registered);
  }

  // Assigns job `id` (a one-file flake, sent inline) and waits for its build.
  void Assign(const std::string& id) {
    const size_t before = executor_.Started();
    kiln::v1::SubmitBuildRequest flake = testing::OneFileFlakeSubmission("{ outputs = _: {}; }", {"default"});
    CoordinatorMessage m;
    kiln::v1::Assignment* a = m.mutable_assign();
    a->set_job_id(id);
    a->set_attempt(1);
    *a->mutable_spec() = flake.targets(0).spec();
    *a->mutable_blobs() = flake.blobs();
    link_.Latest()->Deliver(m);
    ASSERT_TRUE(Eventually([&] { return executor_.Started() == before + 1; }));
  }

  // Index of the first sent message that `match` accepts, or -1.
  int IndexOfSent(const std::function<bool(const WorkerMessage&)>& match) {
    const std::vector<WorkerMessage> sent = link_.Sent();
    for (size_t i = 0; i < sent.size(); ++i) {
      if (match(sent[i])) return static_cast<int>(i);
    }
    return -1;
  }
  static bool IsResult(const WorkerMessage& m) { return m.has_finished() || m.results_size() > 0; }
  static bool IsLogLine(const WorkerMessage& m, const std::string& text) {
    if (!m.has_log()) return false;
    for (const auto& l : m.log().lines()) {
      if (l.text() == text) return true;
    }
    return false;
  }

  testing::TempDir dir_;
  testing::FakeClock clock_;
  WorkerOptions options_;
  FakeCoordinatorLink link_;
  FakeBuildExecutor executor_;
  WorkerMetrics metrics_;
  std::unique_ptr<WorkerAgent> agent_;  // Last: stopped before the fakes go.
};

TEST_F(WorkerAgentLinkTest, AReconnectRegistersWithTheBuildsStillRunning) {
  StartRegistered();
  Assign("7");
  EXPECT_EQ(link_.RegistrationNumber(0).running_size(), 0);
  link_.Latest()->End(absl::UnavailableError("coordinator restarted"));
  ASSERT_TRUE(Eventually([&] { return link_.Connects() >= 2; }));
  const kiln::v1::Register again = link_.RegistrationNumber(1);
  ASSERT_EQ(again.running_size(), 1);
  EXPECT_EQ(again.running(0).job_id(), "7");
  EXPECT_EQ(again.running(0).attempt(), 1u);
  EXPECT_EQ(again.instance_id(), link_.RegistrationNumber(0).instance_id());  // The same process.
  EXPECT_EQ(executor_.Cancelled(), 0u);                                       // Within the lease, builds go on.
}

TEST_F(WorkerAgentLinkTest, AwayLongerThanTheLeaseItCancelsItsBuilds) {
  StartRegistered(/*lease=*/absl::Seconds(30));
  Assign("7");
  link_.SetRefuse(true);
  link_.Latest()->End(absl::UnavailableError("network down"));
  // Attempts fail, but within the lease nothing is cancelled.
  ASSERT_TRUE(Eventually([&] { return link_.Connects() >= 5; }));
  clock_.Advance(absl::Seconds(29));
  const size_t tries = link_.Connects();
  ASSERT_TRUE(Eventually([&] { return link_.Connects() >= tries + 3; }));
  EXPECT_EQ(executor_.Cancelled(), 0u);
  // Past it, the coordinator has requeued them: they stop here.
  clock_.Advance(absl::Seconds(2));
  EXPECT_TRUE(Eventually([&] { return executor_.Cancelled() == 1; }));
}

TEST_F(WorkerAgentLinkTest, AResultWaitsForTheLogCallCarryingItsLastLines) {
  link_.SetHoldLogs(true);
  StartRegistered();
  Assign("7");
  executor_.Line(1, "the last line");
  kiln::v1::BuildResult done;
  done.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  executor_.Finish(1, done);
  ASSERT_TRUE(Eventually([&] { return link_.LogCalls() >= 1; }));
  // Ticks go by (the flush interval is 10 ms); the result stays back.
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_EQ(IndexOfSent(IsResult), -1);
  link_.ReleaseLogs();
  EXPECT_TRUE(Eventually([&] { return IndexOfSent(IsResult) >= 0; }));
}

TEST_F(WorkerAgentLinkTest, WithoutTheLogCallLinesGoOnTheControlStreamBeforeTheResult) {
  link_.SetLogAnswer(absl::UnimplementedError("unknown method SendLogs"));
  StartRegistered();
  Assign("7");
  executor_.Line(1, "first");  // Its call is refused: dropped, and counted.
  ASSERT_TRUE(Eventually([&] { return link_.LogCalls() >= 1; }));
  ASSERT_TRUE(Eventually([&] { return metrics_.log_lines_dropped.Value() >= 1; }));
  executor_.Line(1, "second");
  kiln::v1::BuildResult done;
  done.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  executor_.Finish(1, done);
  ASSERT_TRUE(Eventually([&] { return IndexOfSent(IsResult) >= 0; }));
  const int line = IndexOfSent([](const WorkerMessage& m) { return IsLogLine(m, "second"); });
  ASSERT_GE(line, 0) << "the line after the fallback did not go on the control stream";
  EXPECT_LT(line, IndexOfSent(IsResult));
  EXPECT_EQ(link_.LogCalls(), 1u);  // Not tried again.
}

}  // namespace
}  // namespace kiln
