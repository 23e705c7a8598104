// FodCheckingExecutor over fakes at its three seams: a fake Nix (an inner
// executor that answers each step as the test scripts it), a fake FOD cache
// and a fake local store. What real Nix does with the same steps is tested
// in nix_build_executor_test.cc and tests/e2e/fod_e2e_test.cc.
#include "worker/fod_checking_executor.h"

#include <gtest/gtest.h>

#include <deque>
#include <map>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::testing::kFakeSha256Sri;
using kiln::v1::FodVerdict;

constexpr char kTopDrv[] = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-app.drv";
constexpr char kRightA[] = "sha256-sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=";
constexpr char kRightB[] = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

ClosureFod Fod(const std::string& name, const std::string& declared) {
  ClosureFod fod;
  fod.drv_path = absl::StrCat("/nix/store/", std::string(32, name[0]), "-", name, ".drv");
  fod.fod.name = name;
  fod.fod.output_path = absl::StrCat("/nix/store/", std::string(32, name[0] + 1), "-", name);
  fod.fod.mode = "flat";
  fod.fod.declared = *ParseNixHash(declared);
  fod.fod.key = std::string(64, name[0]);
  return fod;
}

// What Nix 2.8 says when a FOD's hash is wrong.
std::string MismatchError(const ClosureFod& fod, const std::string& got) {
  return absl::StrCat("hash mismatch in fixed-output derivation '", fod.drv_path,
                      "':\n         specified: ", fod.fod.declared.Sri(), "\n            got:    ", got);
}

// A fake Nix: the inner executor. Each step ends on a thread of its own, as
// the real one's do: an evaluation gives `evaluated` (after `release_eval`,
// when set), a handed-over build waits for its derivation, and each build
// of derivations takes the next of `derivation_runs`.
class FakeNix final : public BuildExecutor {
 public:
  struct Run {
    kiln::v1::BuildResult result;
    NixRunReport report;
  };
  struct Started {
    BuildId id;
    BuildRequest request;
  };

  ~FakeNix() override {
    for (std::thread& t : threads_) t.join();
  }

  absl::StatusOr<BuildId> Start(const BuildRequest& request, LineCallback on_line, DoneCallback on_done) override {
    absl::MutexLock lock(&mu_);
    const BuildId id = next_++;
    started.push_back({id, request});
    std::optional<Run> run;
    if (request.step == BuildRequest::Step::kDerivations && !derivation_runs.empty()) {
      run = std::move(derivation_runs.front());
      derivation_runs.pop_front();
    }
    threads_.emplace_back([this, id, request, run = std::move(run), on_line = std::move(on_line),
                           on_done = std::move(on_done)]() mutable {
      kiln::v1::LogLine line;
      line.set_text(absl::StrCat("nix step ", id));
      on_line(std::move(line));
      kiln::v1::BuildResult result;
      NixRunReport report;
      switch (request.step) {
        case BuildRequest::Step::kEvaluate:
          if (release_eval != nullptr) release_eval->WaitForNotification();
          result = IsCancelled(id) ? Cancelled() : evaluated;
          break;
        case BuildRequest::Step::kFlakeAttr:
          if (std::optional<std::string> drv = request.hand_over->Await(); drv.has_value()) {
            absl::MutexLock lock(&mu_);
            handed_over = *drv;
            result = built.result;
            result.set_drv_path(*drv);
            report = built.report;
          } else {
            result = Cancelled();
          }
          break;
        case BuildRequest::Step::kDerivations:
          if (run.has_value()) {
            result = run->result;
            report = run->report;
          } else {
            result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
          }
          break;
      }
      if (request.report != nullptr) *request.report = report;
      std::move(on_done)(std::move(result));
    });
    return id;
  }

  void Cancel(BuildId id) override {
    BuildRequest request;
    {
      absl::MutexLock lock(&mu_);
      cancelled.push_back(id);
      for (const Started& s : started) {
        if (s.id == id) request = s.request;
      }
    }
    if (request.hand_over != nullptr) request.hand_over->Withdraw();
    if (release_eval != nullptr && request.step == BuildRequest::Step::kEvaluate) release_eval->Notify();
  }

  // Scripted before the job starts.
  kiln::v1::BuildResult evaluated;
  Run built;
  std::deque<Run> derivation_runs;
  absl::Notification* release_eval = nullptr;
  // What happened.
  std::vector<Started> started ABSL_GUARDED_BY(mu_);
  std::vector<BuildId> cancelled ABSL_GUARDED_BY(mu_);
  std::string handed_over ABSL_GUARDED_BY(mu_);
  absl::Mutex mu_;

 private:
  static kiln::v1::BuildResult Cancelled() {
    kiln::v1::BuildResult r;
    r.set_code(kiln::v1::RESULT_CODE_CANCELLED);
    return r;
  }
  bool IsCancelled(BuildId id) {
    absl::MutexLock lock(&mu_);
    return std::find(cancelled.begin(), cancelled.end(), id) != cancelled.end();
  }

  BuildId next_ = 1;
  std::vector<std::thread> threads_;
};

// A fake FOD cache: answers `verdicts` (or `error`) and keeps what it is told.
class FakeFodOracle final : public FodOracle {
 public:
  absl::StatusOr<std::vector<FodVerdict>> Check(const std::vector<kiln::v1::FodRef>& fods,
                                                const std::string& job_id) override {
    checked = fods;
    if (!error.ok()) return error;
    return verdicts;
  }
  absl::Status Record(const std::vector<kiln::v1::FodOutcome>& outcomes, const std::string& job_id) override {
    recorded.insert(recorded.end(), outcomes.begin(), outcomes.end());
    return absl::OkStatus();
  }
  std::vector<FodVerdict> verdicts;
  absl::Status error;
  std::vector<kiln::v1::FodRef> checked;
  std::vector<kiln::v1::FodOutcome> recorded;
};

// A fake local store: the closure's FODs and which paths are valid.
class FakeLocalStore final : public LocalStore {
 public:
  absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& drv) override {
    if (drv != kTopDrv) return absl::NotFoundError(absl::StrCat("no ", drv));
    return fods;
  }
  absl::StatusOr<absl::flat_hash_set<std::string>> ValidPaths(const std::vector<std::string>& paths) override {
    absl::flat_hash_set<std::string> out;
    for (const std::string& p : paths) {
      if (valid.contains(p)) out.insert(p);
    }
    return out;
  }
  // The FOD layer uploads nothing.
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> ClosureInfos(const std::vector<std::string>&) override {
    return absl::UnimplementedError("not used by the FOD layer");
  }
  absl::Status DumpNar(const std::string&, NarSink) override { return absl::UnimplementedError("not used"); }
  std::vector<ClosureFod> fods;
  absl::flat_hash_set<std::string> valid;
};

FodVerdict Verdict(FodVerdict::Kind kind, const std::string& hash = "") {
  FodVerdict v;
  v.set_kind(kind);
  v.mutable_entry()->set_hash(hash);
  v.mutable_entry()->set_computed_by_job("7");
  return v;
}

class FodCheckingExecutorTest : public ::testing::Test {
 protected:
  FodCheckingExecutorTest() {
    nix_.evaluated.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
    nix_.evaluated.set_drv_path(kTopDrv);
    nix_.built.result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
    (*nix_.built.result.mutable_outputs())["out"] = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-app";
  }

  struct Outcome {
    std::vector<std::string> lines;
    kiln::v1::BuildResult result;
    absl::Notification done;
  };

  BuildRequest Request(kiln::v1::FodTask::Mode mode = kiln::v1::FodTask::MODE_BUILD) {
    BuildRequest request;
    request.flake_dir = "/work/app";
    request.attr = "default";
    request.job_id = "12";
    request.spec.mutable_fod_task()->set_mode(mode);
    return request;
  }

  BuildExecutor::BuildId Start(FodCheckingExecutor& executor, const BuildRequest& request, Outcome& out) {
    absl::StatusOr<BuildExecutor::BuildId> id = executor.Start(
        request, [&out](kiln::v1::LogLine line) { out.lines.push_back(line.text()); },
        [&out](kiln::v1::BuildResult result) {
          out.result = std::move(result);
          out.done.Notify();
        });
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }

  // Runs one job to its end.
  void Run(const BuildRequest& request, Outcome& out) {
    FodCheckingExecutor executor(&nix_, &oracle_, &store_);
    Start(executor, request, out);
    ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  }

  std::vector<FakeNix::Started> Started() {
    absl::MutexLock lock(&nix_.mu_);
    return nix_.started;
  }
  std::string HandedOver() {
    absl::MutexLock lock(&nix_.mu_);
    return nix_.handed_over;
  }

  static bool AnyLine(const Outcome& out, absl::string_view text) {
    return std::any_of(out.lines.begin(), out.lines.end(),
                       [&](const std::string& l) { return absl::StrContains(l, text); });
  }

  FakeNix nix_;
  FakeFodOracle oracle_;
  FakeLocalStore store_;
};

TEST_F(FodCheckingExecutorTest, TheBuildStartsWithTheEvaluationAndIsHandedTheEvaluatedDerivation) {
  const ClosureFod a = Fod("dep-a", kRightA);
  store_.fods = {a};
  store_.valid = {a.fod.output_path};
  oracle_.verdicts = {Verdict(FodVerdict::KIND_UNKNOWN)};
  nix_.built.report.built = {{a.drv_path, 1.5}, {kTopDrv, 0.5}};
  Outcome out;
  Run(Request(), out);

  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << out.result.error_message();
  EXPECT_EQ(out.result.outputs().at("out"), "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-app");
  EXPECT_EQ(HandedOver(), kTopDrv);
  // The build was started first, waiting for its derivation, then the
  // evaluation; nothing else ran.
  const std::vector<FakeNix::Started> started = Started();
  ASSERT_EQ(started.size(), 2u);
  EXPECT_EQ(started[0].request.step, BuildRequest::Step::kFlakeAttr);
  EXPECT_NE(started[0].request.hand_over, nullptr);
  EXPECT_TRUE(started[0].request.keep_going);
  EXPECT_EQ(started[1].request.step, BuildRequest::Step::kEvaluate);
  ASSERT_EQ(oracle_.checked.size(), 1u);
  EXPECT_EQ(oracle_.checked[0].drv_path(), a.drv_path);
  // The FOD the build built, now valid, verifies its declared hash.
  ASSERT_EQ(oracle_.recorded.size(), 1u);
  EXPECT_EQ(oracle_.recorded[0].got(), kRightA);
  EXPECT_EQ(oracle_.recorded[0].build_seconds(), 1.5);
  EXPECT_TRUE(AnyLine(out, "1 fixed-output derivation(s) checked against the FOD cache: 0 right, 0 wrong"));
  EXPECT_TRUE(AnyLine(out, "nix step"));  // The steps' own lines reach the job's log.
}

TEST_F(FodCheckingExecutorTest, AHashTheCacheKnowsWrongFailsWithTheRightOneAndNothingIsBuilt) {
  const ClosureFod a = Fod("dep-a", kFakeSha256Sri), b = Fod("dep-b", kRightB);
  store_.fods = {a, b};
  oracle_.verdicts = {Verdict(FodVerdict::KIND_WRONG, kRightA), Verdict(FodVerdict::KIND_RIGHT, kRightB)};
  Outcome out;
  Run(Request(), out);

  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_BUILD_FAILED);
  ASSERT_EQ(out.result.hash_mismatches_size(), 1);
  EXPECT_EQ(out.result.hash_mismatches(0).drv_path(), a.drv_path);
  EXPECT_EQ(out.result.hash_mismatches(0).got(), kRightA);
  EXPECT_EQ(out.result.hash_mismatches(0).source(), "cache");
  EXPECT_TRUE(absl::StrContains(out.result.error_message(), kRightA)) << out.result.error_message();
  EXPECT_TRUE(HandedOver().empty());  // Withdrawn: the waiting build built nothing.
  EXPECT_EQ(Started().size(), 2u);
  EXPECT_TRUE(oracle_.recorded.empty());
}

TEST_F(FodCheckingExecutorTest, ASuspectHeldHereIsRebuiltOnTheBuildsSlotsAndItsMismatchFailsTheJob) {
  const ClosureFod a = Fod("dep-a", kRightB), other = Fod("dep-c", kRightB);
  store_.fods = {a, other};
  store_.valid = {a.fod.output_path};  // `other` is not here: realised first, and built here.
  FodVerdict suspect = Verdict(FodVerdict::KIND_SUSPECT_STALE);
  suspect.mutable_stale_source()->set_computed_by_job("3");
  oracle_.verdicts = {suspect, suspect};
  FakeNix::Run realise;
  realise.result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
  realise.report.built = {{other.drv_path, 1}};
  nix_.derivation_runs.push_back(realise);
  FakeNix::Run check;
  check.result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  check.report.errors = {MismatchError(a, kRightA)};
  check.report.built = {{a.drv_path, 2}};
  nix_.derivation_runs.push_back(check);
  Outcome out;
  Run(Request(), out);

  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_BUILD_FAILED);
  ASSERT_EQ(out.result.hash_mismatches_size(), 1);
  EXPECT_EQ(out.result.hash_mismatches(0).source(), "check");
  EXPECT_EQ(out.result.hash_mismatches(0).got(), kRightA);
  const std::vector<FakeNix::Started> started = Started();
  ASSERT_EQ(started.size(), 4u);
  const BuildRequest& realised = started[2].request;
  EXPECT_EQ(realised.step, BuildRequest::Step::kDerivations);
  EXPECT_FALSE(realised.rebuild);
  EXPECT_EQ(realised.drv_paths, std::vector<std::string>{other.drv_path});
  const BuildRequest& rebuild = started[3].request;
  EXPECT_EQ(rebuild.step, BuildRequest::Step::kDerivations);
  EXPECT_TRUE(rebuild.rebuild);
  EXPECT_EQ(rebuild.drv_paths, std::vector<std::string>{a.drv_path});  // Not `other`: built here, so checked.
  EXPECT_EQ(rebuild.share_slots_of, started[0].id);                    // The waiting build's slots.
  EXPECT_TRUE(HandedOver().empty());
  ASSERT_EQ(oracle_.recorded.size(), 1u);  // The cache learns the right hash.
  EXPECT_EQ(oracle_.recorded[0].got(), kRightA);
  EXPECT_TRUE(AnyLine(out, "verifying 'dep-a'"));
}

TEST_F(FodCheckingExecutorTest, ASuspectASubstituterHadIsRebuiltNotTrusted) {
  // The farm store holds the output of the old inputs under the stale hash:
  // realising the suspect substitutes it, so it is rebuilt to be checked.
  const ClosureFod a = Fod("dep-a", kRightB);
  store_.fods = {a};
  FodVerdict suspect = Verdict(FodVerdict::KIND_SUSPECT_STALE);
  suspect.mutable_stale_source()->set_computed_by_job("3");
  oracle_.verdicts = {suspect};
  FakeNix::Run substituted;
  substituted.result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);  // Nothing built.
  nix_.derivation_runs.push_back(substituted);
  FakeNix::Run check;
  check.result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  check.report.errors = {MismatchError(a, kRightA)};
  check.report.built = {{a.drv_path, 2}};
  nix_.derivation_runs.push_back(check);
  Outcome out;
  Run(Request(), out);

  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_BUILD_FAILED);
  ASSERT_EQ(out.result.hash_mismatches_size(), 1);
  EXPECT_EQ(out.result.hash_mismatches(0).got(), kRightA);
  const std::vector<FakeNix::Started> started = Started();
  ASSERT_EQ(started.size(), 4u);
  EXPECT_FALSE(started[2].request.rebuild);
  EXPECT_TRUE(started[3].request.rebuild);
  EXPECT_EQ(started[3].request.drv_paths, std::vector<std::string>{a.drv_path});
  EXPECT_TRUE(HandedOver().empty());
}

TEST_F(FodCheckingExecutorTest, ACancelDuringTheEvaluationStopsEveryStep) {
  store_.fods = {Fod("dep-a", kRightA)};
  absl::Notification release;
  nix_.release_eval = &release;
  FodCheckingExecutor executor(&nix_, &oracle_, &store_);
  Outcome out;
  const BuildExecutor::BuildId id = Start(executor, Request(), out);
  for (int i = 0; i < 1000 && Started().size() < 2; ++i) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_EQ(Started().size(), 2u);
  executor.Cancel(id);
  ASSERT_TRUE(out.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_CANCELLED);
  {
    absl::MutexLock lock(&nix_.mu_);
    EXPECT_EQ(nix_.cancelled.size(), 2u);  // The evaluation and the waiting build.
  }
  EXPECT_TRUE(oracle_.checked.empty());
  EXPECT_TRUE(HandedOver().empty());
}

TEST_F(FodCheckingExecutorTest, AFailedEvaluationIsTheJobsFailure) {
  nix_.evaluated.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  nix_.evaluated.set_error_message("error: flake has no attribute 'default'");
  Outcome out;
  Run(Request(), out);
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_BUILD_FAILED);
  EXPECT_EQ(out.result.error_message(), "error: flake has no attribute 'default'");
  EXPECT_TRUE(HandedOver().empty());
}

TEST_F(FodCheckingExecutorTest, WithTheCacheUnreachableTheBuildRunsWithoutChecks) {
  store_.fods = {Fod("dep-a", kFakeSha256Sri)};
  oracle_.error = absl::UnavailableError("connection refused");
  Outcome out;
  Run(Request(), out);
  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_SUCCEEDED);
  EXPECT_EQ(HandedOver(), kTopDrv);
  EXPECT_TRUE(AnyLine(out, "FOD cache unavailable (connection refused); building without FOD checks"));
}

TEST_F(FodCheckingExecutorTest, ComputingRebuildsTheOutputsHeldHereAndBuildsTheOthers) {
  const ClosureFod a = Fod("dep-a", kFakeSha256Sri), b = Fod("dep-b", kFakeSha256Sri);
  store_.fods = {a, b};
  store_.valid = {a.fod.output_path};
  oracle_.verdicts = {Verdict(FodVerdict::KIND_UNKNOWN), Verdict(FodVerdict::KIND_UNKNOWN)};
  FakeNix::Run held, missing;
  held.result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  held.report.errors = {MismatchError(a, kRightA)};
  missing.result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
  missing.report.errors = {MismatchError(b, kRightB)};
  nix_.derivation_runs = {held, missing};
  BuildRequest request = Request(kiln::v1::FodTask::MODE_COMPUTE);
  request.spec.mutable_fod_task()->add_drv_paths(a.drv_path);
  request.spec.mutable_fod_task()->add_drv_paths(b.drv_path);
  Outcome out;
  Run(request, out);

  EXPECT_EQ(out.result.code(), kiln::v1::RESULT_CODE_SUCCEEDED) << out.result.error_message();
  ASSERT_EQ(out.result.fod_reports_size(), 2);
  EXPECT_EQ(out.result.fod_reports(0).correct(), kRightA);
  EXPECT_EQ(out.result.fod_reports(1).correct(), kRightB);
  EXPECT_EQ(out.result.fod_reports(0).computed_by_job(), "12");
  // No build of the job's own: the evaluation, then one build per group.
  const std::vector<FakeNix::Started> started = Started();
  ASSERT_EQ(started.size(), 3u);
  EXPECT_EQ(started[0].request.step, BuildRequest::Step::kEvaluate);
  EXPECT_TRUE(started[1].request.rebuild);
  EXPECT_EQ(started[1].request.drv_paths, std::vector<std::string>{a.drv_path});
  EXPECT_FALSE(started[2].request.rebuild);
  EXPECT_EQ(started[2].request.drv_paths, std::vector<std::string>{b.drv_path});
  EXPECT_EQ(oracle_.recorded.size(), 2u);
}

}  // namespace
}  // namespace kiln
