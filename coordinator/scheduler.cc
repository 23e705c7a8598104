#include "coordinator/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kiln {

bool WorkerMatches(const WorkerCapabilities& caps, const JobRequirements& req) {
  if (!caps.systems.contains(req.system)) return false;
  for (const auto& f : req.required_features) {
    if (!caps.supported_features.contains(f) && !caps.mandatory_features.contains(f)) return false;
  }
  for (const auto& f : caps.mandatory_features) {
    if (!req.required_features.contains(f)) return false;
  }
  for (const auto& [k, v] : req.pinned_labels) {
    auto it = caps.labels.find(k);
    if (it == caps.labels.end() || it->second != v) return false;
  }
  return true;
}

void Scheduler::AddWorker(const std::string& worker, WorkerCapabilities caps) {
  workers_[worker].caps = std::move(caps);
}

std::vector<std::string> Scheduler::RemoveWorker(const std::string& worker) {
  auto it = workers_.find(worker);
  if (it == workers_.end()) return {};
  std::vector<std::string> jobs = std::move(it->second.jobs);
  for (const auto& j : jobs) running_.erase(j);
  workers_.erase(it);
  return jobs;
}

void Scheduler::Enqueue(const std::string& job, JobRequirements req, bool front) {
  if (queued_index_.contains(job)) return;
  auto pos = front ? queue_.begin() : queue_.end();
  auto it = queue_.insert(pos, QueuedJob{job, std::move(req)});
  queued_index_[job] = it;
}

bool Scheduler::Dequeue(const std::string& job) {
  auto it = queued_index_.find(job);
  if (it == queued_index_.end()) return false;
  queue_.erase(it->second);
  queued_index_.erase(it);
  return true;
}

bool Scheduler::Release(const std::string& job, const std::string& worker) {
  auto it = running_.find(job);
  if (it == running_.end() || it->second != worker) return false;
  running_.erase(it);
  auto& jobs = workers_[worker].jobs;
  jobs.erase(std::remove(jobs.begin(), jobs.end(), job), jobs.end());
  return true;
}

std::vector<Assignment> Scheduler::Assign() {
  std::vector<Assignment> out;
  size_t free = 0;
  for (const auto& [_, w] : workers_) {
    free += static_cast<size_t>(std::max(0, w.caps.max_jobs - static_cast<int>(w.jobs.size())));
  }
  for (auto it = queue_.begin(); it != queue_.end() && free > 0;) {
    WorkerState* best = nullptr;
    const std::string* best_name = nullptr;
    double best_load = 0;
    for (auto& [name, w] : workers_) {
      const int used = static_cast<int>(w.jobs.size());
      if (used >= w.caps.max_jobs || !WorkerMatches(w.caps, it->req)) continue;
      const double load = static_cast<double>(used) / w.caps.max_jobs;
      if (best == nullptr || load < best_load) {
        best = &w;
        best_name = &name;
        best_load = load;
      }
    }
    if (best == nullptr) {
      ++it;
      continue;
    }
    best->jobs.push_back(it->job);
    running_[it->job] = *best_name;
    out.push_back(Assignment{it->job, *best_name});
    queued_index_.erase(it->job);
    it = queue_.erase(it);
    --free;
  }
  return out;
}

std::string Scheduler::WaitingReason(const std::string& job) const {
  auto q = queued_index_.find(job);
  if (q == queued_index_.end()) return "";
  const JobRequirements& req = q->second->req;
  if (workers_.empty()) return "no worker is connected";
  size_t capable = 0;
  for (const auto& [_, w] : workers_) capable += WorkerMatches(w.caps, req) ? 1 : 0;
  if (capable > 0) return absl::StrCat("all ", capable, " capable workers are busy");
  // Name the first property no connected worker offers.
  bool system_ok = false;
  for (const auto& [_, w] : workers_) system_ok |= w.caps.systems.contains(req.system);
  if (!system_ok) return absl::StrCat("no connected worker offers system ", req.system);
  for (const auto& f : req.required_features) {
    bool any = false;
    for (const auto& [_, w] : workers_) {
      any |= w.caps.supported_features.contains(f) || w.caps.mandatory_features.contains(f);
    }
    if (!any) return absl::StrCat("no connected worker offers feature ", f);
  }
  return "no connected worker matches the job's features and labels";
}

std::string Scheduler::WorkerOf(const std::string& job) const {
  auto it = running_.find(job);
  return it == running_.end() ? "" : it->second;
}

size_t Scheduler::total_slots() const {
  size_t n = 0;
  for (const auto& [_, w] : workers_) n += static_cast<size_t>(std::max(0, w.caps.max_jobs));
  return n;
}

}  // namespace kiln
