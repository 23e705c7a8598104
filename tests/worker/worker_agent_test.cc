// The worker's stream and the coordinator's gRPC services together, in one
// process over real loopback gRPC: a CoordinatorServer (real RocksDB), two
// WorkerAgents whose executor is a fake (FakeBuildExecutor: no Nix), and the
// BuildService called as the CLI calls it. The e2e tests cover the same path
// with real processes and Nix; this one is fast, so the sanitizer builds run
// it too (ThreadSanitizer above all: the reactors, the agent's strand and
// reconnect loop, and the coordinator's strand and sender all meet here).
#include "worker/worker_agent.h"

#include <gtest/gtest.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/grpc_util.h"
#include "common/serial_executor.h"
#include "coordinator/coordinator_server.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::v1::JobEvent;

// A BuildExecutor without Nix, named as the fake it is. Each build prints two
// lines, then succeeds at once, or (held) waits for Release() or Cancel().
// Callbacks run on the fake's own thread, as the real executor's do.
class FakeBuildExecutor final : public BuildExecutor {
 public:
  explicit FakeBuildExecutor(bool hold) : hold_(hold) {}

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override {
    std::string flake;
    if (absl::Status s = ReadWholeFile(request.flake_dir + "/flake.nix", flake); !s.ok()) return s;
    BuildId id;
    {
      absl::MutexLock lock(&mu_);
      id = next_id_++;
      builds_[id] = Build{request.attr, std::move(on_line), std::move(on_done)};
      flakes_[request.attr] = flake;
    }
    thread_.Post([this, id] {
      for (int i = 0; i < 2; ++i) {
        kiln::v1::LogLine line;
        absl::MutexLock lock(&mu_);
        auto it = builds_.find(id);
        if (it == builds_.end()) return;
        line.set_text(absl::StrCat("building ", it->second.attr, " step ", i));
        it->second.on_line(std::move(line));
      }
      if (!hold_) Complete(id, kiln::v1::RESULT_CODE_SUCCEEDED);
    });
    return id;
  }

  void Cancel(BuildId id) override {
    thread_.Post([this, id] { Complete(id, kiln::v1::RESULT_CODE_CANCELLED); });
  }

  // Lets the held build of `attr` succeed.
  void Release(const std::string& attr) {
    thread_.Post([this, attr] {
      BuildId id = 0;
      {
        absl::MutexLock lock(&mu_);
        for (const auto& [bid, b] : builds_) {
          if (b.attr == attr) id = bid;
        }
      }
      if (id != 0) Complete(id, kiln::v1::RESULT_CODE_SUCCEEDED);
    });
  }

  // Waits (bounded) until `n` builds have started in all.
  bool WaitForStarts(size_t n) {
    absl::MutexLock lock(&mu_);
    auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return flakes_.size() >= n; };
    return mu_.AwaitWithTimeout(absl::Condition(&enough), absl::Seconds(60));
  }

  std::map<std::string, std::string> flakes() {
    absl::MutexLock lock(&mu_);
    return flakes_;
  }
  int cancelled() {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }

 private:
  struct Build {
    std::string attr;
    LineCallback on_line;
    DoneCallback on_done;
  };

  void Complete(BuildId id, kiln::v1::ResultCode code) {
    DoneCallback done;
    std::string attr;
    {
      absl::MutexLock lock(&mu_);
      auto it = builds_.find(id);
      if (it == builds_.end()) return;
      done = std::move(it->second.on_done);
      attr = it->second.attr;
      builds_.erase(it);
      if (code == kiln::v1::RESULT_CODE_CANCELLED) ++cancelled_;
    }
    kiln::v1::BuildResult result;
    result.set_code(code);
    if (code == kiln::v1::RESULT_CODE_SUCCEEDED) (*result.mutable_outputs())["out"] = "/nix/store/fake-" + attr;
    std::move(done)(std::move(result));
  }

  const bool hold_;
  absl::Mutex mu_;
  BuildId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<BuildId, Build> builds_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> flakes_ ABSL_GUARDED_BY(mu_);  // attr -> flake.nix seen.
  int cancelled_ ABSL_GUARDED_BY(mu_) = 0;
  SerialExecutor thread_{"fake-executor"};  // Last: joined first, before the state it touches goes.
};

// What a watcher saw of one job until it finished.
struct Watched {
  grpc::Status status;
  std::vector<std::string> lines;
  JobEvent::Finished finished;
  std::vector<uint32_t> assigned_attempts;
};

class WorkerAgentTest : public ::testing::Test {
 protected:
  static constexpr char kFlake[] = "{ outputs = _: { }; }  # fake: never evaluated";

  void StartCoordinator(const std::string& listen) {
    CoordinatorOptions options;
    options.listen = listen;
    options.metrics_listen = "127.0.0.1:0";
    options.state_dir = dir_.Sub("state");
    auto server = CoordinatorServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    coordinator_ = *std::move(server);
    stub_ = kiln::v1::BuildService::NewStub(MakeChannel(coordinator_->grpc_address()));
  }

  std::unique_ptr<WorkerAgent> StartAgent(const std::string& name, FakeBuildExecutor* executor, int slots) {
    WorkerOptions options;
    options.coordinator = coordinator_->grpc_address();
    options.name = name;
    options.work_dir = dir_.Sub(name);
    options.max_jobs = slots;
    options.systems = {"x86_64-linux"};
    options.min_backoff = absl::Milliseconds(20);
    options.max_backoff = absl::Milliseconds(200);
    options.log_flush_interval = absl::Milliseconds(10);
    auto agent = std::make_unique<WorkerAgent>(options, executor, &worker_metrics_);
    agent->Start();
    return agent;
  }

  // Submits `targets` targets of a one-file flake; returns their job ids.
  std::vector<std::string> Submit(int targets) {
    std::vector<std::string> attrs;
    for (int i = 0; i < targets; ++i) attrs.push_back(absl::StrCat("pkg", next_attr_++));
    kiln::v1::SubmitBuildRequest request = testing::OneFileFlakeSubmission(kFlake, attrs);
    request.set_submitter("worker_agent_test");
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    kiln::v1::SubmitBuildResponse response;
    grpc::Status status = stub_->SubmitBuild(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return {response.job_ids().begin(), response.job_ids().end()};
  }

  // Follows a job's events until it finishes (bounded).
  Watched Watch(const std::string& job_id) {
    Watched out;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(90));
    kiln::v1::WatchJobRequest request;
    request.set_job_id(job_id);
    auto reader = stub_->WatchJob(&context, request);
    JobEvent event;
    while (reader->Read(&event)) {
      if (event.has_assigned()) out.assigned_attempts.push_back(event.assigned().attempt());
      if (event.has_log()) {
        for (const auto& line : event.log().lines()) out.lines.push_back(line.text());
      }
      if (event.has_finished()) {
        out.finished = event.finished();
        context.TryCancel();
      }
    }
    out.status = reader->Finish();
    return out;
  }

  testing::TempDir dir_;
  int next_attr_ = 0;
  // Declared before the agents and the coordinator, so they outlive them.
  WorkerMetrics worker_metrics_{std::make_shared<prometheus::Registry>()};
  std::unique_ptr<CoordinatorServer> coordinator_;
  std::unique_ptr<kiln::v1::BuildService::Stub> stub_;
};

TEST_F(WorkerAgentTest, TwoWorkersRunABuildsetAndEveryJobReportsItsLogAndResult) {
  StartCoordinator("127.0.0.1:0");
  FakeBuildExecutor executor_a(/*hold=*/false), executor_b(/*hold=*/false);
  auto a = StartAgent("worker-a", &executor_a, 2);
  auto b = StartAgent("worker-b", &executor_b, 2);

  const std::vector<std::string> ids = Submit(12);
  ASSERT_EQ(ids.size(), 12u);
  std::set<std::string> workers;
  for (size_t i = 0; i < ids.size(); ++i) {
    Watched w = Watch(ids[i]);
    EXPECT_EQ(w.finished.state(), kiln::v1::JOB_STATE_SUCCEEDED) << ids[i];
    EXPECT_EQ(w.finished.result().outputs().at("out"), absl::StrCat("/nix/store/fake-pkg", i));
    EXPECT_EQ(w.lines, (std::vector<std::string>{absl::StrCat("building pkg", i, " step 0"),
                                                 absl::StrCat("building pkg", i, " step 1")}));
    EXPECT_EQ(w.assigned_attempts, std::vector<uint32_t>{1});
    workers.insert(w.finished.worker());
  }
  // Every build saw the submitted flake, checked out from the coordinator.
  auto flakes = executor_a.flakes();
  flakes.merge(executor_b.flakes());
  EXPECT_EQ(flakes.size(), 12u);
  for (const auto& [attr, flake] : flakes) EXPECT_EQ(flake, kFlake) << attr;
  for (const std::string& w : workers) EXPECT_TRUE(w == "worker-a" || w == "worker-b") << w;
  a->Stop();
  b->Stop();
}

TEST_F(WorkerAgentTest, CancellingAJobStopsItsBuildOnTheWorker) {
  StartCoordinator("127.0.0.1:0");
  FakeBuildExecutor executor(/*hold=*/true);
  auto agent = StartAgent("worker-a", &executor, 1);
  const std::vector<std::string> ids = Submit(1);
  ASSERT_EQ(ids.size(), 1u);
  ASSERT_TRUE(executor.WaitForStarts(1));

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  kiln::v1::CancelJobRequest cancel;
  cancel.set_job_id(ids[0]);
  kiln::v1::CancelJobResponse response;
  ASSERT_TRUE(stub_->CancelJob(&context, cancel, &response).ok());

  Watched w = Watch(ids[0]);
  EXPECT_EQ(w.finished.state(), kiln::v1::JOB_STATE_CANCELLED);
  // The cancel reached the worker, which stopped the build.
  for (int i = 0; i < 600 && executor.cancelled() == 0; ++i) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_EQ(executor.cancelled(), 1);
  agent->Stop();
}

TEST_F(WorkerAgentTest, ARunningBuildIsReattachedWhenTheCoordinatorComesBack) {
  StartCoordinator("127.0.0.1:0");
  const std::string address = coordinator_->grpc_address();
  FakeBuildExecutor executor(/*hold=*/true);
  auto agent = StartAgent("worker-a", &executor, 1);
  const std::vector<std::string> ids = Submit(1);
  ASSERT_EQ(ids.size(), 1u);
  ASSERT_TRUE(executor.WaitForStarts(1));

  // The coordinator goes away mid-build and comes back on its state; the
  // agent reconnects and reports the build it still runs.
  stub_.reset();
  coordinator_.reset();
  StartCoordinator(address);
  executor.Release("pkg0");

  Watched w = Watch(ids[0]);
  EXPECT_EQ(w.finished.state(), kiln::v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(w.finished.worker(), "worker-a");
  EXPECT_EQ(executor.cancelled(), 0);
  EXPECT_EQ(executor.flakes().size(), 1u);  // Built once: not requeued.
  agent->Stop();
}

TEST_F(WorkerAgentTest, StoppingWhileTheCoordinatorIsAwayCancelsTheBuildsAndWaitsForTheirResults) {
  StartCoordinator("127.0.0.1:0");
  FakeBuildExecutor executor(/*hold=*/true);
  auto agent = StartAgent("worker-a", &executor, 2);
  ASSERT_EQ(Submit(2).size(), 2u);
  ASSERT_TRUE(executor.WaitForStarts(2));
  // The coordinator goes first (as when a host shuts down): the agent is
  // between reconnection attempts when it is told to stop.
  stub_.reset();
  coordinator_.reset();
  absl::SleepFor(absl::Milliseconds(100));
  agent->Stop();
  // Both builds were cancelled, and their results delivered to the agent
  // before Stop() returned: nothing of the agent is used after it (a build
  // left running used to report into the agent's destroyed strand).
  EXPECT_EQ(executor.cancelled(), 2);
  agent.reset();
}

}  // namespace
}  // namespace kiln
