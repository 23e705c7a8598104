#include "coordinator/step_graph.h"

#include <algorithm>
#include <deque>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln {

absl::Duration DurationModel::Expected(const std::string& name) const {
  auto it = average_.find(name);
  return it == average_.end() ? default_ : it->second;
}

void DurationModel::Record(const std::string& name, absl::Duration took) {
  auto [it, inserted] = average_.try_emplace(name, took);
  if (!inserted) it->second += (took - it->second) / 3;
}

const char* StepStateName(StepState state) {
  switch (state) {
    case StepState::kWaiting: return "waiting";
    case StepState::kRunnable: return "queued";
    case StepState::kRunning: return "running";
    case StepState::kDone: return "done";
    case StepState::kFailed: return "failed";
    case StepState::kDropped: return "dropped";
  }
  return "?";
}

absl::StatusOr<StepEffects> StepGraph::AddJob(const std::string& job, int priority_class,
                                              const std::vector<std::string>& tops,
                                              const std::vector<StepSpec>& closure,
                                              const absl::flat_hash_set<std::string>& built) {
  if (jobs_.contains(job)) return absl::AlreadyExistsError(absl::StrCat("job ", job, " has a graph already"));
  absl::flat_hash_map<std::string, const StepSpec*> spec_of;
  for (const StepSpec& s : closure) {
    if (!spec_of.emplace(s.drv_path, &s).second) {
      return absl::InvalidArgumentError(absl::StrCat(s.drv_path, " is listed twice"));
    }
  }
  for (const std::string& t : tops) {
    if (!spec_of.contains(t)) return absl::InvalidArgumentError(absl::StrCat(t, " is not in the closure"));
  }
  // Kahn's order over the closure (inputs first); what remains is a cycle.
  absl::flat_hash_map<std::string, size_t> pending;
  absl::flat_hash_map<std::string, std::vector<const StepSpec*>> needed_by;
  for (const StepSpec& s : closure) {
    pending[s.drv_path] = s.inputs.size();
    for (const std::string& in : s.inputs) {
      if (!spec_of.contains(in)) {
        return absl::InvalidArgumentError(absl::StrCat(in, ", an input of ", s.drv_path, ", is not in the closure"));
      }
      needed_by[in].push_back(&s);
    }
  }
  std::vector<const StepSpec*> order;
  order.reserve(spec_of.size());
  std::deque<const StepSpec*> ready;
  for (const StepSpec& s : closure) {  // In the closure's order: deterministic.
    if (s.inputs.empty()) ready.push_back(&s);
  }
  while (!ready.empty()) {
    const StepSpec* s = ready.front();
    ready.pop_front();
    order.push_back(s);
    for (const StepSpec* d : needed_by[s->drv_path]) {
      if (--pending[d->drv_path] == 0) ready.push_back(d);
    }
  }
  if (order.size() != spec_of.size()) return absl::InvalidArgumentError("the derivation graph has a cycle");

  StepEffects effects;
  Job& j = jobs_[job];
  j.priority_class = priority_class;
  // Inputs first: a step's inputs are settled before it is.
  std::vector<Step*> fresh;  // New, or failed or dropped before: to (re)start.
  for (const StepSpec* spec : order) {
    auto [it, inserted] = steps_.try_emplace(spec->drv_path);
    if (inserted) {
      it->second = std::make_unique<Step>();
      Step& s = *it->second;
      s.drv = spec->drv_path;
      s.name = spec->name;
      s.seq = next_seq_++;
      for (const std::string& in : spec->inputs) {
        Step* input = steps_.at(in).get();
        s.inputs.push_back(input);
        input->dependents.push_back(&s);
      }
    }
    Step& s = *it->second;
    j.steps.push_back(&s);
    s.jobs.insert(job);
    if (inserted || s.state == StepState::kFailed || s.state == StepState::kDropped) {
      s.state = StepState::kWaiting;
      s.priority_class = 1 << 20;  // Set below, from the jobs that need it now.
      fresh.push_back(&s);
    }
    if (built.contains(s.drv) && (s.state == StepState::kWaiting || s.state == StepState::kRunnable)) {
      if (s.state == StepState::kRunnable) runnable_.erase(KeyOf(s));
      s.state = StepState::kDone;
    }
  }
  for (Step* s : fresh) {
    if (s->state != StepState::kWaiting) continue;
    s->inputs_left = 0;
    for (const Step* in : s->inputs) s->inputs_left += in->state != StepState::kDone;
  }
  // Ranks, dependents before their inputs; the class of the most urgent job.
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    Step& s = *steps_.at((*it)->drv_path);
    int64_t longest = 0;
    for (const Step* d : s.dependents) {
      if (d->state != StepState::kDone && d->state != StepState::kFailed && d->state != StepState::kDropped) {
        longest = std::max(longest, d->rank_ns);
      }
    }
    SetOrder(s, std::min(s.priority_class, priority_class),
             absl::ToInt64Nanoseconds(durations_->Expected(s.name)) + longest);
  }
  for (Step* s : fresh) {
    if (s->state == StepState::kWaiting && s->inputs_left == 0) MakeRunnable(*s, effects);
  }
  for (const std::string& t : tops) {
    Step& s = *steps_.at(t);
    if (s.top_of.insert(job).second && s.state != StepState::kDone) ++j.tops_left;
  }
  if (j.tops_left == 0) {
    effects.jobs_finished.push_back({job, JobOutcome{.succeeded = true}});
    Leave(job, effects);
  }
  return effects;
}

void StepGraph::MakeRunnable(Step& s, StepEffects& effects) {
  s.state = StepState::kRunnable;
  runnable_.emplace(KeyOf(s), &s);
  effects.runnable.push_back(s.drv);
}

void StepGraph::SetOrder(Step& s, int priority_class, int64_t rank_ns) {
  if (s.priority_class == priority_class && s.rank_ns == rank_ns) return;
  const bool queued = s.state == StepState::kRunnable;
  if (queued) runnable_.erase(KeyOf(s));
  s.priority_class = priority_class;
  s.rank_ns = rank_ns;
  if (queued) runnable_.emplace(KeyOf(s), &s);
}

std::vector<std::string> StepGraph::Runnable(size_t limit) const {
  std::vector<std::string> out;
  for (auto it = runnable_.begin(); it != runnable_.end() && out.size() < limit; ++it) out.push_back(it->second->drv);
  return out;
}

absl::StatusOr<StepGraph::Step*> StepGraph::StepIn(const std::string& drv, StepState state) {
  auto it = steps_.find(drv);
  if (it == steps_.end() || it->second->state != state) {
    return absl::FailedPreconditionError(absl::StrCat(drv, " is not ", StepStateName(state)));
  }
  return it->second.get();
}

absl::Status StepGraph::Started(const std::string& drv) {
  ASSIGN_OR_RETURN(Step * s, StepIn(drv, StepState::kRunnable));
  runnable_.erase(KeyOf(*s));
  s->state = StepState::kRunning;
  return absl::OkStatus();
}

absl::Status StepGraph::Requeue(const std::string& drv) {
  ASSIGN_OR_RETURN(Step * s, StepIn(drv, StepState::kRunning));
  StepEffects ignored;
  MakeRunnable(*s, ignored);
  return absl::OkStatus();
}

absl::StatusOr<StepEffects> StepGraph::Succeeded(const std::string& drv) {
  ASSIGN_OR_RETURN(Step * running, StepIn(drv, StepState::kRunning));
  Step& s = *running;
  s.state = StepState::kDone;
  StepEffects effects;
  for (Step* d : s.dependents) {
    if (d->state == StepState::kWaiting && --d->inputs_left == 0) MakeRunnable(*d, effects);
  }
  std::vector<std::string> finished;
  for (const std::string& job : s.top_of) {
    if (--jobs_.at(job).tops_left == 0) finished.push_back(job);
  }
  std::sort(finished.begin(), finished.end());
  for (const std::string& job : finished) {
    effects.jobs_finished.push_back({job, JobOutcome{.succeeded = true}});
    Leave(job, effects);
  }
  return effects;
}

absl::StatusOr<StepEffects> StepGraph::Failed(const std::string& drv, const std::string& message) {
  ASSIGN_OR_RETURN(Step * running, StepIn(drv, StepState::kRunning));
  Step& s = *running;
  s.state = StepState::kFailed;
  StepEffects effects;
  std::vector<std::string> failed(s.jobs.begin(), s.jobs.end());
  std::sort(failed.begin(), failed.end());
  for (const std::string& job : failed) {
    effects.jobs_finished.push_back({job, JobOutcome{.failed_step = drv, .message = message}});
    Leave(job, effects);
  }
  return effects;
}

StepEffects StepGraph::CancelJob(const std::string& job) {
  StepEffects effects;
  if (!jobs_.contains(job)) return effects;
  effects.jobs_finished.push_back({job, JobOutcome{.cancelled = true}});
  Leave(job, effects);
  return effects;
}

void StepGraph::Leave(const std::string& job, StepEffects& effects) {
  auto it = jobs_.find(job);
  if (it == jobs_.end()) return;
  for (Step* s : it->second.steps) {
    s->jobs.erase(job);
    s->top_of.erase(job);
    if (!s->jobs.empty()) {
      // Its class is now that of the most urgent job left.
      int most_urgent = 1 << 20;
      for (const std::string& other : s->jobs) most_urgent = std::min(most_urgent, jobs_.at(other).priority_class);
      SetOrder(*s, most_urgent, s->rank_ns);
      continue;
    }
    switch (s->state) {
      case StepState::kRunnable:
        runnable_.erase(KeyOf(*s));
        s->state = StepState::kDropped;
        break;
      case StepState::kWaiting: s->state = StepState::kDropped; break;
      case StepState::kRunning:
        s->state = StepState::kDropped;
        effects.stop.push_back(s->drv);
        break;
      default: break;
    }
  }
  jobs_.erase(it);
}

std::optional<StepState> StepGraph::state(const std::string& drv) const {
  auto it = steps_.find(drv);
  if (it == steps_.end()) return std::nullopt;
  return it->second->state;
}

std::map<StepState, size_t> StepGraph::Counts(const std::string& job) const {
  std::map<StepState, size_t> counts;
  if (job.empty()) {
    for (const auto& [drv, s] : steps_) ++counts[s->state];
  } else if (auto it = jobs_.find(job); it != jobs_.end()) {
    for (const Step* s : it->second.steps) ++counts[s->state];
  }
  return counts;
}

absl::Duration StepGraph::RemainingCriticalPath(const std::string& job) const {
  auto it = jobs_.find(job);
  if (it == jobs_.end()) return absl::ZeroDuration();
  int64_t longest = 0;
  for (const Step* s : it->second.steps) {
    if (s->state == StepState::kWaiting || s->state == StepState::kRunnable || s->state == StepState::kRunning) {
      longest = std::max(longest, s->rank_ns);
    }
  }
  return absl::Nanoseconds(longest);
}

}  // namespace kiln
