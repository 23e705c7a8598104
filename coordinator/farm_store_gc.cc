#include "coordinator/farm_store_gc.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <queue>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "coordinator/farm_store.h"

namespace kiln {

FarmGcPlan PlanFarmGc(const std::vector<FarmGcNode>& nodes, const absl::flat_hash_set<std::string>& pinned_roots,
                      uint64_t max_bytes, uint64_t target_bytes) {
  FarmGcPlan plan;
  absl::flat_hash_map<std::string, size_t> index;
  absl::flat_hash_map<std::string, uint64_t> file_users;
  for (size_t i = 0; i < nodes.size(); ++i) {
    index[nodes[i].hash_part] = i;
    if (file_users[nodes[i].file]++ == 0) plan.bytes_before += nodes[i].file_bytes;
  }
  plan.bytes_after = plan.bytes_before;
  if (plan.bytes_before <= max_bytes) return plan;

  // The pinned closures.
  std::vector<bool> pinned(nodes.size(), false);
  std::vector<size_t> todo;
  for (const std::string& root : pinned_roots) {
    if (auto it = index.find(root); it != index.end()) todo.push_back(it->second);
  }
  while (!todo.empty()) {
    const size_t i = todo.back();
    todo.pop_back();
    if (pinned[i]) continue;
    pinned[i] = true;
    ++plan.pinned;
    for (const std::string& r : nodes[i].references) {
      if (auto it = index.find(r); it != index.end() && !pinned[it->second]) todo.push_back(it->second);
    }
  }
  // How many paths reference each path (itself not counted).
  std::vector<uint32_t> referrers(nodes.size(), 0);
  for (const FarmGcNode& n : nodes) {
    for (const std::string& r : n.references) {
      if (r == n.hash_part) continue;
      if (auto it = index.find(r); it != index.end()) ++referrers[it->second];
    }
  }
  // Oldest use first; ties by hash part, so a plan is deterministic.
  const auto later = [&](size_t a, size_t b) {
    if (nodes[a].last_used != nodes[b].last_used) return nodes[a].last_used > nodes[b].last_used;
    return nodes[a].hash_part > nodes[b].hash_part;
  };
  std::priority_queue<size_t, std::vector<size_t>, decltype(later)> ready(later);
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (referrers[i] == 0 && !pinned[i]) ready.push(i);
  }
  while (plan.bytes_after > target_bytes && !ready.empty()) {
    const size_t i = ready.top();
    ready.pop();
    const FarmGcNode& n = nodes[i];
    plan.collect.push_back(n.hash_part);
    if (--file_users[n.file] == 0) {
      plan.files_freed.push_back(n.file);
      plan.bytes_after -= n.file_bytes;
    }
    for (const std::string& r : n.references) {
      if (r == n.hash_part) continue;
      auto it = index.find(r);
      if (it == index.end()) continue;
      if (--referrers[it->second] == 0 && !pinned[it->second]) ready.push(it->second);
    }
  }
  return plan;
}

absl::StatusOr<FarmGcReport> IndexedFarmStore::CollectGarbage(const FarmGcPolicy& policy) {
  FarmGcReport report;
  {
    absl::MutexLock lock(&mu_);
    report.paths_left = stats_.paths;
    report.bytes_left = stats_.file_bytes;
    if (stats_.file_bytes <= policy.max_bytes) return report;
  }
  absl::flat_hash_set<std::string> pinned;
  for (const std::string& root : policy.pinned_roots) {
    if (absl::StatusOr<std::string> h = StorePathHashPart(root); h.ok()) pinned.insert(*h);
  }
  std::vector<NarInfo> collected;
  FarmGcPlan plan;
  {
    // Uploads wait for their records meanwhile (their bodies go on): what
    // is planned is what is carried out.
    absl::MutexLock lock(&mu_);
    std::vector<FarmGcNode> nodes;
    absl::flat_hash_map<std::string, NarInfo> infos;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), family_));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      ASSIGN_OR_RETURN(NarInfo info, ParseNarInfo(absl::string_view(it->value().data(), it->value().size())));
      FarmGcNode& n = nodes.emplace_back();
      n.hash_part = it->key().ToString();
      for (const std::string& r : info.references) {
        if (absl::StatusOr<std::string> h = StorePathHashPart(r); h.ok()) n.references.push_back(*h);
      }
      n.file = info.url.substr(info.url.rfind('/') + 1);
      n.file_bytes = info.file_size;
      n.last_used = LastUsed(n.hash_part, info);
      infos.emplace(n.hash_part, std::move(info));
    }
    if (!it->status().ok()) return absl::InternalError(absl::StrCat("farm store read: ", it->status().ToString()));
    plan = PlanFarmGc(nodes, pinned, policy.max_bytes, std::min(policy.target_bytes, policy.max_bytes));
    rocksdb::WriteBatch batch;
    for (const std::string& h : plan.collect) {
      batch.Delete(family_, h);
      collected.push_back(std::move(infos[h]));
    }
    rocksdb::WriteOptions options;
    options.sync = sync_;
    if (rocksdb::Status s = db_->Write(options, &batch); !s.ok()) {
      return absl::InternalError(absl::StrCat("farm store write: ", s.ToString()));
    }
    stats_.paths = nodes.size() - plan.collect.size();
    stats_.file_bytes = plan.bytes_after;
    report.paths_left = stats_.paths;
    report.bytes_left = stats_.file_bytes;
    // The records are gone: now the bodies (a crash here leaves bodies no
    // record names, which the next start removes). Under the lock: an
    // upload of the same bytes must not find the body about to go.
    RemoveBodies(plan.files_freed, collected);
  }
  report.paths_collected = plan.collect.size();
  report.bytes_collected = plan.bytes_before - plan.bytes_after;
  report.paths_pinned = plan.pinned;
  return report;
}

}  // namespace kiln
