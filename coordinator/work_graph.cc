#include "coordinator/work_graph.h"

#include <algorithm>
#include <map>

#include "absl/hash/hash.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/check.h"
#include "common/digest.h"
#include "common/grpc_util.h"

namespace kiln {

using kiln::state::v1::JobRecord;
using kiln::v1::JobState;

bool IsTerminal(JobState state) {
  return state == kiln::v1::JOB_STATE_SUCCEEDED || state == kiln::v1::JOB_STATE_FAILED ||
         state == kiln::v1::JOB_STATE_CANCELLED;
}

std::string WorkGraph::ItemKey(const kiln::v1::JobSpec& spec) {
  std::vector<std::string> features(spec.requirements().required_features().begin(),
                                    spec.requirements().required_features().end());
  std::sort(features.begin(), features.end());
  std::map<std::string, std::string> labels(spec.requirements().pinned_labels().begin(),
                                            spec.requirements().pinned_labels().end());
  std::string key =
      absl::StrCat(spec.source().tree_root().hash(), "\x1f", spec.source().flake_subdir(), "\x1f", spec.attr(), "\x1f",
                   spec.requirements().system(), "\x1f", absl::StrJoin(features, ","), "\x1f");
  for (const auto& [k, v] : labels) absl::StrAppend(&key, k, "=", v, ",");
  if (spec.has_fod_task()) {
    absl::StrAppend(&key, "\x1f", "fod", static_cast<int>(spec.fod_task().mode()), ":",
                    absl::StrJoin(spec.fod_task().drv_paths(), ","));
  }
  if (spec.has_push()) {
    absl::StrAppend(&key, "\x1f", spec.push().repository(), "\x1f", absl::StrJoin(spec.push().tags(), ","), "\x1f",
                    static_cast<int>(spec.push().manifest_format()));
  }
  return key;
}

uint64_t WorkGraph::ItemHash(const kiln::v1::JobSpec& spec) { return absl::Hash<std::string>{}(ItemKey(spec)); }

std::string WorkGraph::ResultKey(const kiln::v1::Digest& flake_subtree, const kiln::v1::JobSpec& spec) {
  // What determines the output: the flake's own files (its flake.lock
  // included), the attribute and the system; and where the image goes.
  std::string key = absl::StrCat("kiln-result-v1\x1f", flake_subtree.hash(), "\x1f", spec.attr(), "\x1f",
                                 spec.requirements().system());
  if (spec.has_push()) {
    absl::StrAppend(&key, "\x1f", spec.push().repository(), "\x1f", absl::StrJoin(spec.push().tags(), ","), "\x1f",
                    static_cast<int>(spec.push().manifest_format()));
  }
  return Sha256Hex(key);
}

std::string WorkGraph::SharingReason(const std::string& runner) {
  return absl::StrCat("identical to job ", runner, ", already in flight: it will share that job's result");
}

WorkGraph::Job* WorkGraph::Find(const std::string& id) {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : &it->second;
}

const WorkGraph::Job* WorkGraph::Find(const std::string& id) const {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : &it->second;
}

JobRecord& WorkGraph::Rec(Job& job) {
  if (!job.parsed) {
    job.parsed = std::make_unique<JobRecord>();
    // The bytes were produced by this process or read back from the store
    // (which parsed them once at recovery): they parse.
    KILN_CHECK(job.parsed->ParseFromString(job.packed));
  }
  if (!job.touched) {
    job.touched = true;
    touched_.push_back(&job);
  }
  return *job.parsed;
}

const JobRecord& WorkGraph::View(const Job& job, JobRecord& scratch) {
  if (job.parsed) return *job.parsed;
  KILN_CHECK(scratch.ParseFromString(job.packed));
  return scratch;
}

void WorkGraph::Persist(Job& job) {
  KILN_CHECK(job.parsed != nullptr);  // Changed through Rec().
  if (job.dirty) return;
  job.dirty = true;
  pending_jobs_.push_back(&job);
}

void WorkGraph::Reserve(size_t jobs) {
  // Sized once (ids are dense: the counter bounds the number of jobs):
  // growing maps of a million entries step by step costs rehashing and page
  // faults on every doubling.
  jobs_.reserve(jobs);
  items_.reserve(jobs);
}

WorkGraph::Job& WorkGraph::Load(absl::string_view packed, const JobRecord& record, absl::Time now) {
  const std::string& id = record.job_id();
  buildsets_[record.buildset_id()].push_back(id);
  Job& job = jobs_[id];
  job.packed.assign(packed.data(), packed.size());
  job.queued_at = now;
  if (!IsTerminal(record.state()) && !record.token().empty()) ++active_by_token_[record.token()];
  return job;
}

void WorkGraph::SetCounters(uint64_t next_job_seq, uint64_t next_buildset_seq) {
  next_job_seq_ = next_job_seq;
  next_buildset_seq_ = next_buildset_seq;
}

std::string WorkGraph::NextBuildsetId() const { return absl::StrCat("b", next_buildset_seq_); }

std::string WorkGraph::NextJobId(size_t index) const { return absl::StrCat(next_job_seq_ + index); }

void WorkGraph::Accept(size_t jobs) {
  next_job_seq_ += jobs;
  next_buildset_seq_ += 1;
}

WorkGraph::Job& WorkGraph::Add(std::unique_ptr<JobRecord> record, std::string packed, absl::Time now) {
  const std::string id = record->job_id();
  buildsets_[record->buildset_id()].push_back(id);
  if (!IsTerminal(record->state()) && !record->token().empty()) ++active_by_token_[record->token()];
  Job& job = jobs_[id];
  job.parsed = std::move(record);
  job.packed = std::move(packed);
  job.touched = true;
  touched_.push_back(&job);
  job.queued_at = now;
  return job;
}

WorkGraph::Admitted WorkGraph::Admit(const std::string& id, const JobRecord& record) {
  const std::string key = ItemKey(record.spec());
  auto [it, fresh] = items_.try_emplace(absl::Hash<std::string>{}(key), WorkItem{.runner = id});
  JobRecord scratch;
  if (!fresh && it->second.runner != id && ItemKey(View(jobs_.at(it->second.runner), scratch).spec()) == key) {
    it->second.waiting.push_back(id);
    return {.shares_with = it->second.runner};
  }
  return {};  // It runs its item (or, on a hash collision, a key of its own).
}

void WorkGraph::HoldItem(const std::string& id, const JobRecord& record) {
  items_.try_emplace(ItemHash(record.spec()), WorkItem{.runner = id});
}

std::string WorkGraph::RunnerOf(const std::string& id, const JobRecord& record) const {
  if (IsTerminal(record.state())) return "";
  auto it = items_.find(ItemHash(record.spec()));
  if (it == items_.end() || it->second.runner == id) return "";
  const auto& waiting = it->second.waiting;
  return std::find(waiting.begin(), waiting.end(), id) != waiting.end() ? it->second.runner : "";
}

WorkGraph::Left WorkGraph::Leave(const std::string& id, const JobRecord& record) {
  Left out;
  auto it = items_.find(ItemHash(record.spec()));
  if (it == items_.end()) return out;
  if (it->second.runner == id) {
    out.waiting = std::move(it->second.waiting);
    items_.erase(it);
    return out;
  }
  // A sharing job ends on its own only when cancelled: it stops waiting.
  auto& waiting = it->second.waiting;
  waiting.erase(std::remove(waiting.begin(), waiting.end(), id), waiting.end());
  return out;
}

void WorkGraph::MarkAssigned(Job& job, const std::string& worker) {
  JobRecord& r = Rec(job);
  r.set_state(kiln::v1::JOB_STATE_ASSIGNED);
  r.set_attempt(r.attempt() + 1);
  r.set_worker(worker);
  Persist(job);
}

void WorkGraph::MarkStarted(Job& job, absl::Time now) {
  Rec(job).set_state(kiln::v1::JOB_STATE_RUNNING);
  *Rec(job).mutable_started_at() = ToProtoTime(now);
  Persist(job);
}

std::optional<absl::Time> WorkGraph::Requeue(Job& job, const std::string& reason, uint32_t max_attempts,
                                             absl::Duration backoff, absl::Time now) {
  JobRecord& r = Rec(job);
  if (r.attempt() >= max_attempts) return std::nullopt;
  r.set_state(kiln::v1::JOB_STATE_QUEUED);
  r.set_requeue_reason(reason);
  r.clear_started_at();
  Persist(job);
  job.queued_at = now;
  if (backoff <= absl::ZeroDuration()) return absl::InfinitePast();
  const int doublings = static_cast<int>(std::min<uint32_t>(r.attempt(), 7)) - 1;
  return now + std::min(backoff * (1 << std::max(0, doublings)), absl::Minutes(5));
}

void WorkGraph::End(Job& job, JobState state, kiln::v1::BuildResult result, absl::Time now) {
  JobRecord& r = Rec(job);
  if (const std::string& token = r.token(); !token.empty() && !IsTerminal(r.state())) {
    if (auto it = active_by_token_.find(token); it != active_by_token_.end() && --it->second == 0) {
      active_by_token_.erase(it);
    }
  }
  r.set_state(state);
  *r.mutable_result() = std::move(result);
  *r.mutable_finished_at() = ToProtoTime(now);
  Persist(job);
}

void WorkGraph::CacheResult(const std::string& key, const JobRecord& done) {
  // Jobs sharing an item have the same key: one entry is enough.
  if (!pending_results_.empty() && pending_results_.back().first == key) return;
  kiln::state::v1::CachedResult entry;
  *entry.mutable_result() = done.result();
  entry.set_job_id(done.job_id());
  entry.set_worker(done.worker());
  *entry.mutable_finished_at() = done.finished_at();
  pending_results_.emplace_back(key, std::move(entry));
}

WorkGraph::Job* WorkGraph::FindAttempt(const std::string& worker, const std::string& id, uint32_t attempt) {
  Job* job = Find(id);
  if (job == nullptr) return nullptr;
  // Fencing: only the current attempt on the worker it was given to counts.
  const JobRecord& r = Rec(*job);
  if (r.worker() != worker || r.attempt() != attempt || IsTerminal(r.state())) return nullptr;
  return job;
}

uint64_t WorkGraph::ActiveOf(const std::string& token) const {
  auto it = active_by_token_.find(token);
  return it == active_by_token_.end() ? 0 : it->second;
}

const std::vector<std::string>* WorkGraph::BuildsetJobs(const std::string& buildset_id) const {
  auto it = buildsets_.find(buildset_id);
  return it == buildsets_.end() ? nullptr : &it->second;
}

kiln::v1::ListBuildsetsResponse WorkGraph::ListBuildsets(size_t limit) const {
  // Ids are "b" and a sequence number: the newest have the largest.
  std::vector<std::pair<uint64_t, const std::string*>> ids;
  ids.reserve(buildsets_.size());
  for (const auto& [id, jobs] : buildsets_) {
    uint64_t n = 0;
    if (!absl::SimpleAtoi(absl::string_view(id).substr(1), &n)) continue;
    ids.emplace_back(n, &id);
  }
  const size_t take = std::min(limit, ids.size());
  std::partial_sort(ids.begin(), ids.begin() + static_cast<ptrdiff_t>(take), ids.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first; });
  kiln::v1::ListBuildsetsResponse out;
  JobRecord scratch;
  for (size_t i = 0; i < take; ++i) {
    const std::string& id = *ids[i].second;
    kiln::v1::BuildsetSummary* summary = out.add_buildsets();
    summary->set_buildset_id(id);
    google::protobuf::Timestamp finished;
    bool all_finished = true;
    for (const std::string& job_id : buildsets_.at(id)) {
      const Job* job = Find(job_id);
      if (job == nullptr) continue;
      const JobRecord& r = View(*job, scratch);
      if (summary->targets() == 0) {
        summary->set_submitter(r.submitter());
        *summary->mutable_submitted_at() = r.submitted_at();
      }
      summary->set_targets(summary->targets() + 1);
      if (summary->installables_size() < 16) summary->add_installables(r.spec().display_name());
      switch (r.state()) {
        case kiln::v1::JOB_STATE_SUCCEEDED:
          summary->set_succeeded(summary->succeeded() + 1);
          if (r.result().cached()) summary->set_cached(summary->cached() + 1);
          break;
        case kiln::v1::JOB_STATE_FAILED: summary->set_failed(summary->failed() + 1); break;
        case kiln::v1::JOB_STATE_CANCELLED: summary->set_cancelled(summary->cancelled() + 1); break;
        default:
          summary->set_unfinished(summary->unfinished() + 1);
          all_finished = false;
          break;
      }
      if (IsTerminal(r.state()) && FromProtoTime(r.finished_at()) > FromProtoTime(finished)) {
        finished = r.finished_at();
      }
    }
    if (all_finished && summary->targets() > 0) *summary->mutable_finished_at() = finished;
  }
  return out;
}

void WorkGraph::TakeWrites(std::vector<std::pair<const std::string*, const std::string*>>& packed_jobs,
                           std::vector<std::pair<std::string, const kiln::state::v1::CachedResult*>>& cached_results) {
  for (const auto& [key, entry] : pending_results_) cached_results.emplace_back(key, &entry);
  packed_jobs.reserve(packed_jobs.size() + pending_jobs_.size());
  for (Job* job : pending_jobs_) {
    job->dirty = false;
    job->parsed->SerializeToString(&job->packed);
    packed_jobs.emplace_back(&job->parsed->job_id(), &job->packed);
  }
}

void WorkGraph::Committed() {
  pending_jobs_.clear();
  pending_results_.clear();
}

void WorkGraph::WriteFailed() {
  // Nobody heard of these changes yet; they go with the next write.
  for (Job* job : pending_jobs_) job->dirty = true;
}

void WorkGraph::DropParsed() {
  // Queued and finished jobs keep only their serialized record: most jobs
  // are in one of those states, and a parsed record costs ~5 times more.
  for (Job* job : touched_) {
    job->touched = false;
    const JobState state = job->parsed->state();
    if (state == kiln::v1::JOB_STATE_QUEUED || IsTerminal(state)) job->parsed.reset();
  }
  touched_.clear();
}

}  // namespace kiln
