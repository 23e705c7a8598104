#include "coordinator/scheduler.h"

#include <algorithm>
#include <cmath>

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

namespace {

uint64_t Fnv1a(absl::string_view text, uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// splitmix64's finaliser: spreads FNV's weak low bits over the whole word.
uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

std::string RequirementKey(const JobRequirements& r) {
  std::string key = r.system;
  for (const auto& f : r.required_features)
    absl::StrAppend(&key,
                    "\x1f"
                    "f",
                    f);
  for (const auto& [k, v] : r.pinned_labels)
    absl::StrAppend(&key,
                    "\x1f"
                    "l",
                    k, "=", v);
  return key;
}

std::string Unmet(const JobRequirements& req, const std::vector<const WorkerCapabilities*>& workers,
                  absl::string_view who) {
  bool system_ok = false;
  for (const auto* w : workers) system_ok |= w->systems.contains(req.system);
  if (!system_ok) return absl::StrCat("no ", who, " offers system ", req.system);
  for (const auto& f : req.required_features) {
    bool any = false;
    for (const auto* w : workers) any |= w->supported_features.contains(f) || w->mandatory_features.contains(f);
    if (!any) return absl::StrCat("no ", who, " offers feature ", f);
  }
  for (const auto& [k, v] : req.pinned_labels) {
    bool any = false;
    for (const auto* w : workers) {
      auto it = w->labels.find(k);
      any |= it != w->labels.end() && it->second == v;
    }
    if (!any) return absl::StrCat("no ", who, " has label ", k, "=", v);
  }
  for (const auto* w : workers) {
    if (WorkerMatches(*w, req)) return "";
  }
  return absl::StrCat("no ", who, " matches the job's system, features, labels and mandatory features together");
}

}  // namespace

HashRing::HashRing(const std::vector<std::pair<std::string, double>>& members) : members_(members.size()) {
  for (uint32_t i = 0; i < members.size(); ++i) {
    const double weight = members[i].second > 0 ? members[i].second : 1.0;
    const int points = std::max(1, static_cast<int>(std::lround(weight * kPointsPerWeight)));
    const uint64_t base = Fnv1a(members[i].first);
    for (int p = 0; p < points; ++p) points_.emplace_back(Mix(base ^ Mix(static_cast<uint64_t>(p) + 1)), i);
  }
  std::sort(points_.begin(), points_.end());
}

uint64_t HashRing::KeyPoint(absl::string_view key) { return Mix(Fnv1a(key)); }

uint32_t HashRing::Owner(absl::string_view key) const {
  uint32_t owner = 0;
  Walk(key, [&](uint32_t m) {
    owner = m;
    return true;
  });
  return owner;
}

void Scheduler::AddWorker(const std::string& worker, WorkerCapabilities caps) {
  if (caps.speed_factor <= 0) caps.speed_factor = 1.0;
  known_[worker] = caps;
  WorkerState& w = workers_[worker];
  Update(w, [&] {
    w.caps = std::move(caps);
    w.online = true;
  });
  matching_cache_.clear();
}

bool Scheduler::SetOnline(const std::string& worker, bool online) {
  auto it = workers_.find(worker);
  if (it == workers_.end()) return false;
  Update(it->second, [&] { it->second.online = online; });
  return true;
}

WorkerCapabilities Scheduler::CapabilitiesOf(const std::string& worker) const {
  auto it = workers_.find(worker);
  return it == workers_.end() ? WorkerCapabilities{} : it->second.caps;
}

std::string Scheduler::OverLimitOf(const std::string& worker) const {
  auto it = workers_.find(worker);
  return it == workers_.end() ? "" : it->second.over_limit;
}

bool Scheduler::SetOverLimit(const std::string& worker, std::string reason) {
  auto it = workers_.find(worker);
  if (it == workers_.end()) return false;
  Update(it->second, [&] { it->second.over_limit = std::move(reason); });
  return true;
}

void Scheduler::Reattach(const std::string& job, const std::string& worker) {
  if (running_.contains(job)) return;
  EraseQueued(job);
  auto [it, fresh] = workers_.try_emplace(worker);
  if (fresh) {
    it->second.caps.max_jobs = 0;
    it->second.online = false;
    matching_cache_.clear();
  }
  WorkerState& w = it->second;
  Update(w, [&] { w.jobs.push_back(job); });
  running_[job] = worker;
}

std::vector<std::string> Scheduler::JobsOf(const std::string& worker) const {
  auto it = workers_.find(worker);
  return it == workers_.end() ? std::vector<std::string>{} : it->second.jobs;
}

bool Scheduler::EraseQueued(const std::string& job) {
  auto it = queued_.find(job);
  if (it == queued_.end()) return false;
  RequirementSet* reqs = it->second.reqs;
  auto count = queued_by_class_system_.find({it->second.priority_class, reqs->req.system});
  if (--count->second == 0) queued_by_class_system_.erase(count);
  queued_.erase(it);
  if (--reqs->jobs == 0) requirement_sets_.erase(reqs->key);
  return true;
}

size_t Scheduler::used_slots() const {
  size_t n = 0;
  for (const auto& [_, w] : workers_) n += w.online ? w.jobs.size() : 0;
  return n;
}

std::vector<Scheduler::WorkerView> Scheduler::Workers() const {
  std::vector<WorkerView> out;
  out.reserve(workers_.size());
  for (const auto& [name, w] : workers_) {
    out.push_back(WorkerView{.name = name,
                             .caps = w.caps,
                             .jobs = w.jobs,
                             .draining = w.draining,
                             .online = w.online,
                             .over_limit = w.over_limit});
  }
  return out;
}

int64_t Scheduler::CountFreeSlots() const {
  int64_t n = 0;
  for (const auto& [_, w] : workers_) n += w.free();
  return n;
}

std::vector<std::string> Scheduler::RemoveWorker(const std::string& worker) {
  auto it = workers_.find(worker);
  if (it == workers_.end()) return {};
  free_slots_ -= it->second.free();
  std::vector<std::string> jobs = std::move(it->second.jobs);
  for (const auto& j : jobs) running_.erase(j);
  workers_.erase(it);
  matching_cache_.clear();
  return jobs;
}

bool Scheduler::SetDraining(const std::string& worker, bool draining) {
  auto it = workers_.find(worker);
  if (it == workers_.end()) return false;
  Update(it->second, [&] { it->second.draining = draining; });
  return true;
}

void Scheduler::Enqueue(const std::string& job, JobRequirements req, JobPlacement placement, bool front) {
  if (queued_.contains(job) || running_.contains(job)) return;
  const int cls_index = std::clamp(placement.priority_class, 0, kPriorityClasses - 1);
  std::string key = RequirementKey(req);
  auto [set, new_set] = requirement_sets_.try_emplace(key);
  if (new_set) {
    set->second.req = std::move(req);
    set->second.key = std::move(key);
  }
  ++set->second.jobs;
  QueuedJob q{
      .reqs = &set->second,
      .buildset = placement.buildset,
      .locality_point = HashRing::KeyPoint(placement.locality_key),
      .seq = next_seq_++,
      .not_before_ns = placement.not_before == absl::InfinitePast() ? 0 : absl::ToUnixNanos(placement.not_before),
      .priority_class = static_cast<int8_t>(cls_index),
      .has_locality = !placement.locality_key.empty()};
  PriorityClass& cls = classes_[cls_index];
  // A buildset is in the rotation exactly while it has a queue here; one that
  // becomes active takes its turn after those already waiting.
  auto [bs, fresh] = cls.by_buildset.try_emplace(placement.buildset);
  if (fresh) cls.rotation.push_back(placement.buildset);
  Entry entry{job, q.seq};
  if (front) {
    bs->second.push_front(std::move(entry));
  } else {
    bs->second.push_back(std::move(entry));
  }
  ++queued_by_class_system_[{cls_index, set->second.req.system}];
  queued_.emplace(job, std::move(q));
}

bool Scheduler::Dequeue(const std::string& job) {
  // The queue entry goes stale and is dropped when the scan reaches it.
  return EraseQueued(job);
}

bool Scheduler::Release(const std::string& job, const std::string& worker) {
  auto it = running_.find(job);
  if (it == running_.end() || it->second != worker) return false;
  running_.erase(it);
  WorkerState& w = workers_[worker];
  Update(w, [&] { w.jobs.erase(std::remove(w.jobs.begin(), w.jobs.end(), job), w.jobs.end()); });
  return true;
}

const Scheduler::MatchSet& Scheduler::Matching(const QueuedJob& q) {
  auto [it, fresh] = matching_cache_.try_emplace(q.reqs->key);
  if (fresh) {
    std::vector<std::pair<std::string, double>> members;
    for (auto& entry : workers_) {
      if (!WorkerMatches(entry.second.caps, q.reqs->req)) continue;
      it->second.workers.push_back(&entry);
      members.emplace_back(entry.first, entry.second.caps.speed_factor);
    }
    it->second.ring = HashRing(members);
  }
  return it->second;
}

bool Scheduler::Place(const std::string& job, const QueuedJob& q, std::vector<Assignment>& out) {
  // Fallback candidates sampled along the ring when the preferred worker is
  // full: enough for a near-even spread, few enough to stay O(1) per job.
  constexpr int kFallbackSample = 8;
  const MatchSet& m = Matching(q);
  WorkerNode* chosen = nullptr;
  const auto load = [](const WorkerNode* n) {
    return static_cast<double>(n->second.jobs.size()) / std::max(1, n->second.caps.max_jobs);
  };
  // Less loaded; then faster; then by name (deterministic).
  const auto better = [&](const WorkerNode* a, const WorkerNode* b) {
    if (b == nullptr) return true;
    if (load(a) != load(b)) return load(a) < load(b);
    if (a->second.caps.speed_factor != b->second.caps.speed_factor) {
      return a->second.caps.speed_factor > b->second.caps.speed_factor;
    }
    return a->first < b->first;
  };
  if (q.has_locality) {
    bool preferred_seen = false;
    int sampled = 0;
    m.ring.WalkFrom(q.locality_point, [&](uint32_t i) {
      WorkerNode* node = m.workers[i];
      if (!node->second.online || node->second.draining) return false;  // Not a candidate at all.
      if (!preferred_seen) {
        preferred_seen = true;
        if (node->second.free() > 0) {
          chosen = node;
          return true;
        }
        return false;
      }
      if (node->second.free() > 0 && better(node, chosen)) chosen = node;
      return ++sampled >= kFallbackSample;
    });
  }
  if (chosen == nullptr) {
    for (WorkerNode* node : m.workers) {
      if (node->second.free() > 0 && better(node, chosen)) chosen = node;
    }
  }
  if (chosen == nullptr) return false;
  Update(chosen->second, [&] { chosen->second.jobs.push_back(job); });
  running_[job] = chosen->first;
  out.push_back(Assignment{job, chosen->first});
  return true;
}

std::vector<Assignment> Scheduler::Assign(absl::Time now) {
  const int64_t now_ns = now == absl::InfiniteFuture() ? INT64_MAX : absl::ToUnixNanos(now);
  std::vector<Assignment> out;
  if (free_slots_ <= 0 || queued_.empty()) return out;
  // Requirement keys that found no free worker this round: later jobs with
  // the same key are skipped without another search.
  absl::flat_hash_set<const RequirementSet*> blocked;
  for (PriorityClass& cls : classes_) {
    std::list<std::string> stalled;  // Placed nothing this round; keep their turn.
    while (free_slots_ > 0 && !cls.rotation.empty()) {
      const std::string buildset = std::move(cls.rotation.front());
      cls.rotation.pop_front();
      std::deque<Entry>& entries = cls.by_buildset[buildset];
      bool placed = false;
      // Look past at most this many jobs that cannot be placed now: a long
      // queue of them must not make every round O(queue).
      constexpr size_t kMaxSkipped = 64;
      size_t skipped = 0;
      for (size_t i = 0; i < entries.size() && skipped <= kMaxSkipped;) {
        auto q = queued_.find(entries[i].job);
        if (q == queued_.end() || q->second.seq != entries[i].seq) {
          entries.erase(entries.begin() + static_cast<std::ptrdiff_t>(i));  // Cancelled or requeued since.
          continue;
        }
        if (q->second.not_before_ns > now_ns) {
          // Backing off: not placeable yet, and says nothing about its workers.
        } else if (!blocked.contains(q->second.reqs)) {
          if (Place(entries[i].job, q->second, out)) {
            EraseQueued(entries[i].job);
            entries.erase(entries.begin() + static_cast<std::ptrdiff_t>(i));
            placed = true;
            break;
          }
          blocked.insert(q->second.reqs);
        }
        ++i;
        ++skipped;
      }
      if (entries.empty()) {
        cls.by_buildset.erase(buildset);
      } else if (placed) {
        cls.rotation.push_back(buildset);
      } else {
        stalled.push_back(buildset);
      }
    }
    cls.rotation.splice(cls.rotation.begin(), stalled);
  }
  return out;
}

std::string Scheduler::WaitingReason(const std::string& job, absl::Time now) const {
  auto q = queued_.find(job);
  if (q == queued_.end()) return "";
  if (q->second.not_before_ns > 0 && absl::FromUnixNanos(q->second.not_before_ns) > now) {
    return absl::StrCat(
        "retry back-off until ",
        absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixNanos(q->second.not_before_ns), absl::UTCTimeZone()));
  }
  const JobRequirements& req = q->second.reqs->req;
  size_t capable = 0, draining = 0;
  std::vector<std::string> limits;  // "name: reason" of capable workers over a limit.
  std::vector<const WorkerCapabilities*> connected;
  for (const auto& [name, w] : workers_) {
    if (!w.online) continue;
    connected.push_back(&w.caps);
    if (!WorkerMatches(w.caps, req)) continue;
    ++capable;
    if (w.draining) {
      ++draining;
    } else if (!w.over_limit.empty()) {
      limits.push_back(absl::StrCat(name, ": ", w.over_limit));
    }
  }
  if (connected.empty()) return "no worker is connected";
  if (capable > 0 && draining == capable) return absl::StrCat("all ", capable, " capable workers are draining");
  if (capable > 0 && limits.size() == capable) {
    return absl::StrCat("all ", capable, " capable workers are over their limits (", absl::StrJoin(limits, "; "), ")");
  }
  if (capable > 0) {
    if (draining == 0 && limits.empty()) return absl::StrCat("all ", capable, " capable workers are busy");
    std::vector<std::string> details;
    if (draining > 0) details.push_back(absl::StrCat(draining, " draining"));
    details.insert(details.end(), limits.begin(), limits.end());
    return absl::StrCat("all ", capable, " capable workers are busy, draining or over their limits (",
                        absl::StrJoin(details, "; "), ")");
  }
  return Unmet(req, connected, "connected worker");
}

std::set<std::string> Scheduler::KnownSystems() const {
  std::set<std::string> out;
  for (const auto& [_, caps] : known_) out.insert(caps.systems.begin(), caps.systems.end());
  return out;
}

std::string Scheduler::UnmetByKnownWorkers(const JobRequirements& req) const {
  std::vector<const WorkerCapabilities*> known;
  for (const auto& [_, caps] : known_) known.push_back(&caps);
  if (known.empty()) return "no worker has registered yet";
  return Unmet(req, known, "worker");
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
