#include "worker/fod_checking_executor.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/hash_mismatch.h"

namespace kiln {

using kiln::v1::FodVerdict;

namespace {

std::string FormatTime(const google::protobuf::Timestamp& t) {
  return absl::FormatTime("%Y-%m-%d %H:%M UTC", FromProtoTime(t), absl::UTCTimeZone());
}

// A step's failure as the job's: its code (build failed, timed out, …) and
// Nix's message.
void FailWith(const kiln::v1::BuildResult& step, kiln::v1::BuildResult& result) {
  result.set_code(step.code());
  result.set_error_message(step.error_message());
}

}  // namespace

struct FodCheckingExecutor::Job {
  BuildId id = 0;
  BuildRequest request;
  LineCallback on_line;
  DoneCallback on_done;
  absl::Time started;
  std::shared_ptr<DerivationHandOver> hand_over;  // The job's build's (FOD tasks have none).
  // Lines come from this layer and from each step's Nix: one at a time.
  absl::Mutex line_mu;
  void Emit(kiln::v1::LogLine line) ABSL_LOCKS_EXCLUDED(line_mu) {
    absl::MutexLock lock(&line_mu);
    on_line(std::move(line));
  }
  // Both guarded by the executor's mu_.
  bool cancelled = false;
  std::vector<BuildId> running;  // The inner executor's steps running now.
};

struct FodCheckingExecutor::Step {
  BuildId inner_id = 0;  // 0: it did not start.
  absl::Notification done;
  kiln::v1::BuildResult result;
  std::shared_ptr<NixRunReport> report = std::make_shared<NixRunReport>();  // What its Nix said.
};

FodCheckingExecutor::~FodCheckingExecutor() {
  std::vector<BuildId> ids;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [id, job] : jobs_) ids.push_back(id);
  }
  for (BuildId id : ids) Cancel(id);
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](absl::flat_hash_map<BuildId, std::shared_ptr<Job>>* jobs) { return jobs->empty(); }, &jobs_));
}

absl::StatusOr<BuildExecutor::BuildId> FodCheckingExecutor::Start(const BuildRequest& request, LineCallback on_line,
                                                                  DoneCallback on_done) {
  if (request.flake_dir.empty() || request.flake_dir[0] != '/') {
    return absl::InvalidArgumentError("flake directory must be absolute");
  }
  auto job = std::make_shared<Job>();
  job->request = request;
  job->on_line = std::move(on_line);
  job->on_done = std::move(on_done);
  job->started = absl::Now();
  BuildId id;
  {
    absl::MutexLock lock(&mu_);
    id = job->id = next_id_++;
    jobs_[id] = job;
  }
  // A thread per job: its steps wait on Nix and on the coordinator in turn.
  threads_.Start(id, [this, job] { Execute(job); });
  return id;
}

void FodCheckingExecutor::Cancel(BuildId id) {
  std::vector<BuildId> running;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return;
    it->second->cancelled = true;
    running = it->second->running;
  }
  for (BuildId step : running) inner_->Cancel(step);
}

bool FodCheckingExecutor::Cancelled(Job& job) {
  absl::MutexLock lock(&mu_);
  return job.cancelled;
}

void FodCheckingExecutor::StartStep(Job& job, BuildRequest request, Step& step) {
  if (Cancelled(job)) {
    step.result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
    step.done.Notify();
    return;
  }
  request.report = step.report;
  absl::StatusOr<BuildId> id = inner_->Start(
      request, [&job](kiln::v1::LogLine line) { job.Emit(std::move(line)); },
      [&step](kiln::v1::BuildResult result) mutable {
        step.result = std::move(result);
        step.done.Notify();
      });
  if (!id.ok()) {
    step.result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    step.result.set_error_message(std::string(id.status().message()));
    step.done.Notify();
    return;
  }
  step.inner_id = *id;
  bool cancel_now = false;
  {
    absl::MutexLock lock(&mu_);
    cancel_now = job.cancelled;  // Cancel came while it started.
    if (!cancel_now) job.running.push_back(*id);
  }
  if (cancel_now) inner_->Cancel(*id);
}

kiln::v1::BuildResult FodCheckingExecutor::RunStep(Job& job, BuildRequest request, NixRunReport* report) {
  Step step;
  StartStep(job, std::move(request), step);
  step.done.WaitForNotification();
  if (step.inner_id != 0) {
    absl::MutexLock lock(&mu_);
    std::erase(job.running, step.inner_id);
  }
  if (report != nullptr) *report = std::move(*step.report);
  return std::move(step.result);
}

void FodCheckingExecutor::Line(Job& job, absl::string_view text) {
  kiln::v1::LogLine line;
  line.set_text(absl::StrCat("kiln: ", text));
  *line.mutable_time() = ToProtoTime(absl::Now());
  job.Emit(std::move(line));
}

void FodCheckingExecutor::Record(Job& job, const std::vector<kiln::v1::FodOutcome>& outcomes) {
  if (outcomes.empty()) return;
  // The cache learns less; the build's own result stands.
  if (absl::Status s = oracle_->Record(outcomes, job.request.job_id); !s.ok()) {
    Line(job, absl::StrCat("could not record FOD results: ", s.message()));
  }
}

std::vector<kiln::v1::FodOutcome> FodCheckingExecutor::Harvest(Job& job, const ClosureIndex& index,
                                                               const NixRunReport& nix, absl::string_view source,
                                                               kiln::v1::BuildResult& result) {
  std::string note;
  std::vector<kiln::v1::FodOutcome> outcomes = HarvestFods(
      index, nix, source, [this](const std::vector<std::string>& paths) { return store_->ValidPaths(paths); }, result,
      &note);
  if (!note.empty()) Line(job, note);
  return outcomes;
}

void FodCheckingExecutor::Execute(const std::shared_ptr<Job>& job) {
  kiln::v1::BuildResult result;
  // The job's build starts now and waits for its derivation (step 1).
  // FOD tasks build no derivation of their own.
  std::unique_ptr<Step> build;
  if (job->request.spec.fod_task().mode() == kiln::v1::FodTask::MODE_BUILD) {
    job->hand_over = std::make_shared<DerivationHandOver>();
    BuildRequest request = job->request;
    request.step = BuildRequest::Step::kFlakeAttr;
    request.hand_over = job->hand_over;
    request.keep_going = true;
    build = std::make_unique<Step>();
    StartStep(*job, std::move(request), *build);
  }
  CheckAndBuild(*job, build.get(), result);
  if (build != nullptr) {
    job->hand_over->Withdraw();  // Unless it was given its derivation.
    build->done.WaitForNotification();
  }
  if (Cancelled(*job)) {
    result.Clear();
    result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
    result.set_error_message("build cancelled");
  }
  *result.mutable_build_duration() = ToProtoDuration(absl::Now() - job->started);
  std::move(job->on_done)(std::move(result));
  absl::MutexLock lock(&mu_);
  jobs_.erase(job->id);
}

namespace {

// A request for a step of `job`: its directory, attribute, spec and id.
BuildRequest StepOf(const BuildRequest& job, BuildRequest::Step step) {
  BuildRequest request;
  request.flake_dir = job.flake_dir;
  request.attr = job.attr;
  request.spec = job.spec;
  request.job_id = job.job_id;
  request.step = step;
  return request;
}

}  // namespace

void FodCheckingExecutor::CheckAndBuild(Job& job, Step* build, kiln::v1::BuildResult& result) {
  // 1. Evaluate once: the .drv, and with it the closure's .drv files.
  kiln::v1::BuildResult eval = RunStep(job, StepOf(job.request, BuildRequest::Step::kEvaluate));
  if (Cancelled(job)) return;
  if (eval.code() != kiln::v1::RESULT_CODE_SUCCEEDED) return FailWith(eval, result);
  const std::string drv = eval.drv_path();

  // 2. The closure's FODs, looked up in one call.
  std::vector<ClosureFod> fods;
  if (absl::StatusOr<std::vector<ClosureFod>> found = store_->FixedOutputsOfClosure(drv); found.ok()) {
    fods = *std::move(found);
  } else {
    Line(job, absl::StrCat("FOD checks skipped: ", found.status().message()));
  }
  std::vector<FodVerdict> verdicts;
  if (!fods.empty()) {
    std::vector<kiln::v1::FodRef> refs;
    for (const ClosureFod& f : fods) refs.push_back(RefOf(f));
    if (absl::StatusOr<std::vector<FodVerdict>> v = oracle_->Check(refs, job.request.job_id); v.ok()) {
      verdicts = *std::move(v);
    } else {
      Line(job, absl::StrCat("FOD cache unavailable (", v.status().message(), "); building without FOD checks"));
    }
  }
  const ClosureIndex index(fods);
  switch (job.request.spec.fod_task().mode()) {
    case kiln::v1::FodTask::MODE_SCAN: return ReportFods(fods, verdicts, result);
    case kiln::v1::FodTask::MODE_COMPUTE: return ComputeFods(job, fods, index, result);
    default: break;
  }

  // 3. Hashes the cache knows to be wrong: fail now, build nothing.
  std::vector<size_t> suspects;
  size_t counts[5] = {0, 0, 0, 0, 0};
  std::vector<std::string> messages;
  for (size_t i = 0; i < verdicts.size() && i < fods.size(); ++i) {
    const FodVerdict& v = verdicts[i];
    ++counts[std::min<size_t>(static_cast<size_t>(v.kind()), 4)];
    if (v.kind() == FodVerdict::KIND_WRONG) {
      kiln::v1::HashMismatch* m = result.add_hash_mismatches();
      m->set_drv_path(fods[i].drv_path);
      m->set_name(fods[i].fod.name);
      m->set_specified(fods[i].fod.declared.Sri());
      m->set_got(v.entry().hash());
      m->set_source("cache");
      m->set_computed_by_job(v.entry().computed_by_job());
      m->set_computed_by_worker(v.entry().computed_by_worker());
      messages.push_back(DescribeMismatch(*m, FormatTime(v.entry().first_computed())));
    } else if (v.kind() == FodVerdict::KIND_SUSPECT_STALE) {
      suspects.push_back(i);
    }
  }
  // A suspect whose output Nix holds is rebuilt to check it. One it does
  // not hold must not simply be fetched: a substituter (the farm store
  // first) has the output of the old inputs under the same hash, and the
  // job would use it unchecked. So it is realised first — built, which
  // computes its hash, or substituted — and then rebuilt if substituted.
  std::vector<size_t> absent_suspects;
  if (!suspects.empty()) {
    std::vector<std::string> outputs;
    for (size_t i : suspects) outputs.push_back(fods[i].fod.output_path);
    absl::StatusOr<absl::flat_hash_set<std::string>> valid = store_->ValidPaths(outputs);
    if (!valid.ok()) {
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(std::string(valid.status().message()));
      return;
    }
    for (size_t i : suspects) {
      if (!valid->contains(fods[i].fod.output_path)) absent_suspects.push_back(i);
    }
    std::erase_if(suspects, [&](size_t i) { return !valid->contains(fods[i].fod.output_path); });
  }
  for (const ClosureFod& f : fods) {
    if (TakesWholeFlakeSource(f)) {
      Line(job, absl::StrCat("note: FOD '", f.fod.name, "' takes the whole flake source as an input: every edit of ",
                             "the flake changes its inputs and needs its hash computed again; give it only the ",
                             "files it needs (e.g. the lockfile)"));
    }
  }
  if (!verdicts.empty()) {
    Line(job,
         absl::StrCat(verdicts.size(), " fixed-output derivation(s) checked against the FOD cache: ",
                      counts[FodVerdict::KIND_RIGHT], " right, ", counts[FodVerdict::KIND_WRONG], " wrong, ",
                      counts[FodVerdict::KIND_SUSPECT_STALE], " suspect, ", counts[FodVerdict::KIND_NONDETERMINISTIC],
                      " nondeterministic, ", counts[FodVerdict::KIND_UNKNOWN], " unknown"));
  }
  if (!messages.empty()) {
    for (const auto& m : result.hash_mismatches()) {
      Line(job, absl::StrCat("FOD '", m.name(), "' declares ", m.specified(), "; its inputs produce ", m.got(),
                             " (known from the FOD cache: not built)"));
    }
    result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
    result.set_error_message(absl::StrJoin(messages, "\n"));
    return;
  }

  // 4. Suspected stale hashes: those not here are realised, then those
  // that came from a substituter, and those that were here, are rebuilt to
  // verify; on the slots of the job's build (which waits meanwhile).
  // A step over suspects' derivations on the build's slots; false when the
  // job ended there (cancelled, a mismatch found, the step failed).
  const auto check_step = [&](const std::vector<size_t>& which, bool rebuild, const char* source, NixRunReport& nix) {
    BuildRequest request = StepOf(job.request, BuildRequest::Step::kDerivations);
    request.rebuild = rebuild;
    request.keep_going = true;
    request.share_slots_of = build != nullptr ? build->inner_id : 0;
    for (size_t i : which) request.drv_paths.push_back(fods[i].drv_path);
    kiln::v1::BuildResult step = RunStep(job, std::move(request), &nix);
    if (Cancelled(job)) return false;
    Record(job, Harvest(job, index, nix, source, result));
    if (result.hash_mismatches_size() > 0) {
      for (const auto& m : result.hash_mismatches()) messages.push_back(DescribeMismatch(m, ""));
      result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
      result.set_error_message(absl::StrJoin(messages, "\n"));
      return false;
    }
    if (step.code() != kiln::v1::RESULT_CODE_SUCCEEDED) {
      FailWith(step, result);
      return false;
    }
    return true;
  };
  if (!absent_suspects.empty()) {
    NixRunReport nix;
    if (!check_step(absent_suspects, /*rebuild=*/false, "build", nix)) return;
    // Built here: its hash was computed and checked. Substituted: check it.
    absl::flat_hash_set<std::string> built;
    for (const NixRunReport::Built& b : nix.built) built.insert(b.drv_path);
    for (size_t i : absent_suspects) {
      if (!built.contains(fods[i].drv_path)) suspects.push_back(i);
    }
  }
  if (!suspects.empty()) {
    for (size_t i : suspects) {
      Line(job, absl::StrCat("verifying '", fods[i].fod.name, "': its hash ", fods[i].fod.declared.Sri(),
                             " was computed for other inputs (job ", verdicts[i].stale_source().computed_by_job(),
                             "); rebuilding the output held here"));
    }
    NixRunReport nix;
    if (!check_step(suspects, /*rebuild=*/true, "check", nix)) return;
  }

  // 5. The build itself, of the .drv evaluated above.
  if (build == nullptr) return;
  job.hand_over->Give(drv);
  build->done.WaitForNotification();
  if (Cancelled(job)) return;
  result = build->result;
  kiln::v1::BuildResult harvested;
  std::vector<kiln::v1::FodOutcome> outcomes = Harvest(job, index, *build->report, "build", harvested);
  // 6. What the build taught the cache.
  Record(job, outcomes);
  for (const auto& m : harvested.hash_mismatches()) {
    *result.add_hash_mismatches() = m;
    absl::StrAppend(result.mutable_error_message(), "\n", FixLine(m));
  }
}

void FodCheckingExecutor::ComputeFods(Job& job, const std::vector<ClosureFod>& fods, const ClosureIndex& index,
                                      kiln::v1::BuildResult& result) {
  // The FODs asked for; those whose output is here are rebuilt (Nix would
  // otherwise trust them), the others built.
  std::vector<const ClosureFod*> targets;
  for (const std::string& drv : job.request.spec.fod_task().drv_paths()) {
    const ClosureFod* fod = index.Find(drv);
    if (fod == nullptr || fod->drv_path != drv) {
      result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
      result.set_error_message(absl::StrCat(drv, " is not a fixed-output derivation of this closure"));
      return;
    }
    targets.push_back(fod);
  }
  // Nix decides what is here: a directory a failed or interrupted build left
  // at the output path is not (`--rebuild` would refuse it; a build replaces
  // it).
  std::vector<std::string> outputs;
  for (const ClosureFod* fod : targets) outputs.push_back(fod->fod.output_path);
  absl::StatusOr<absl::flat_hash_set<std::string>> valid = store_->ValidPaths(outputs);
  if (!valid.ok()) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(std::string(valid.status().message()));
    return;
  }
  std::vector<std::string> held, missing;
  for (const ClosureFod* fod : targets) {
    (valid->contains(fod->fod.output_path) ? held : missing).push_back(fod->drv_path);
  }
  std::vector<kiln::v1::FodOutcome> outcomes;
  kiln::v1::BuildResult found;
  std::vector<std::string> errors;
  for (const auto* group : {&held, &missing}) {
    if (group->empty()) continue;
    BuildRequest request = StepOf(job.request, BuildRequest::Step::kDerivations);
    request.drv_paths = *group;
    request.rebuild = group == &held;
    request.keep_going = true;
    Line(job, absl::StrCat(group == &held ? "rebuilding " : "building ", group->size(),
                           " fixed-output derivation(s) to compute their hashes"));
    NixRunReport nix;
    RunStep(job, std::move(request), &nix);
    if (Cancelled(job)) return;
    std::vector<kiln::v1::FodOutcome> got = Harvest(job, index, nix, "build", found);
    outcomes.insert(outcomes.end(), got.begin(), got.end());
    for (const std::string& e : nix.errors) {
      if (ParseHashMismatches(e).empty()) errors.push_back(e);
    }
  }
  Record(job, outcomes);
  bool all = true;
  for (const ClosureFod* fod : targets) {
    kiln::v1::FodReport* r = result.add_fod_reports();
    *r = ReportOf(*fod);
    for (const auto& o : outcomes) {
      if (o.fod().drv_path() == fod->drv_path) r->set_correct(o.got());
    }
    r->set_verdict(r->correct().empty() ? "failed" : "computed");
    r->set_source("computed");
    r->set_computed_by_job(job.request.job_id);
    all = all && !r->correct().empty();
  }
  result.set_code(all ? kiln::v1::RESULT_CODE_SUCCEEDED : kiln::v1::RESULT_CODE_BUILD_FAILED);
  if (!all) {
    result.set_error_message(errors.empty() ? "a fixed-output derivation failed to build"
                                            : absl::StrJoin(errors, "\n"));
  }
}

}  // namespace kiln
