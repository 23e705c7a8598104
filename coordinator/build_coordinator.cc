#include "coordinator/build_coordinator.h"

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "absl/algorithm/container.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/check.h"
#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "common/digest.h"
#include "common/image_ref.h"
#include "common/source_tree.h"
#include "common/grpc_util.h"
#include "common/installable.h"
#include "common/log.h"
#include "coordinator/job_log.h"
#include "coordinator/rocks_status.h"

namespace kiln {

using kiln::state::v1::JobRecord;
using kiln::v1::BuildResult;
using kiln::v1::JobEvent;
using kiln::v1::JobState;

namespace {

constexpr absl::string_view kComponent = "coordinator";

absl::string_view ResultLabel(JobState state) {
  switch (state) {
    case kiln::v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case kiln::v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "failed";
  }
}

void CountPush(CoordinatorMetrics& metrics, const kiln::v1::PushResult& push) {
  metrics.push_bytes.Increment(static_cast<double>(std::max<int64_t>(push.bytes_uploaded(), 0)));
  auto count = [&](const kiln::v1::PushedBlob& blob) {
    metrics.PushBlobs(blob.mounted() ? "mounted" : blob.skipped() ? "skipped" : "pushed").Increment();
  };
  if (push.has_config()) count(push.config());
  for (const kiln::v1::PushedBlob& layer : push.layers()) count(layer);
}

}  // namespace

BuildCoordinator::BuildCoordinator(StateStore* store, CoordinatorMetrics* metrics, const Clock* clock,
                                   BuildCoordinatorOptions options, BlobStore* cas)
    : store_(store),
      cas_(cas),
      metrics_(metrics),
      clock_(clock),
      options_(std::move(options)),
      started_(clock_->Now()),
      // Distinct per start: the start time in nanoseconds (never 0, which
      // a watcher that saw no event sends). The wall clock, not the
      // injected one: it must differ between two runs of a test too.
      journal_(clock_, static_cast<uint64_t>(absl::ToUnixNanos(absl::Now())),
               JobJournalOptions{.log_bytes_per_job = options_.log_bytes_per_job,
                                 .finished_jobs_with_logs = options_.finished_jobs_with_logs,
                                 .log_retention_bytes = options_.log_retention_bytes}),
      validator_(SubmissionLimits{.max_source_bytes = options_.max_source_bytes,
                                  .max_tree_bytes = options_.max_tree_bytes,
                                  .max_targets = options_.max_targets,
                                  .max_active_jobs_per_token = options_.max_active_jobs_per_token,
                                  .priority_names = options_.priority_names,
                                  .push_allow = options_.push_allow},
                 cas),
      registry_(clock_, WorkerRegistryOptions{.heartbeat_interval = options_.heartbeat_interval,
                                              .lease = options_.lease,
                                              .max_worker_jobs = options_.max_worker_jobs,
                                              .min_store_free_bytes = options_.min_store_free_bytes,
                                              .min_work_dir_free_bytes = options_.min_work_dir_free_bytes,
                                              .max_memory_used_fraction = options_.max_memory_used_fraction,
                                              .max_load_per_slot = options_.max_load_per_slot}) {
  metrics_->state_writable.Set(1);
}

bool BuildCoordinator::IsTerminal(JobState state) {
  return state == kiln::v1::JOB_STATE_SUCCEEDED || state == kiln::v1::JOB_STATE_FAILED ||
         state == kiln::v1::JOB_STATE_CANCELLED;
}

JobRequirements BuildCoordinator::RequirementsOf(const kiln::v1::JobSpec& spec) {
  JobRequirements req;
  req.system = spec.requirements().system();
  req.required_features.insert(spec.requirements().required_features().begin(),
                               spec.requirements().required_features().end());
  req.pinned_labels.insert(spec.requirements().pinned_labels().begin(),
                           spec.requirements().pinned_labels().end());
  return req;
}

JobPlacement BuildCoordinator::PlacementOf(const JobRecord& record) {
  JobPlacement placement;
  switch (record.spec().priority()) {
    case kiln::v1::PRIORITY_INTERACTIVE: placement.priority_class = 0; break;
    case kiln::v1::PRIORITY_BATCH: placement.priority_class = 2; break;
    default: placement.priority_class = 1; break;
  }
  placement.buildset = record.buildset_id();
  const auto& spec = record.spec();
  placement.locality_key = !spec.locality_key().empty()
                               ? spec.locality_key()
                               : absl::StrCat(spec.source().tree_root().hash(), "/", spec.source().flake_subdir(),
                                              "#", spec.attr());
  return placement;
}

std::optional<kiln::v1::Digest> BuildCoordinator::FlakeSubtree(const kiln::v1::SourceRef& source,
                                                               const BlobLookup& inline_blobs) const {
  // node_hash_map: the lookup hands out pointers that must survive inserts.
  absl::node_hash_map<std::string, std::string> read;
  const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    if (const std::string* data = inline_blobs(hash)) return data;
    absl::StatusOr<std::string> blob = cas_ != nullptr ? cas_->ReadAll(hash) : store_->GetBlob(hash);
    if (!blob.ok()) return nullptr;
    return &read.emplace(hash, *std::move(blob)).first->second;
  };
  // Absent or unreadable: no key (the worker will say there is no flake there).
  absl::StatusOr<kiln::v1::Digest> subtree = FindSubtree(source.tree_root(), source.flake_subdir(), lookup);
  if (!subtree.ok()) return std::nullopt;
  return *std::move(subtree);
}

bool BuildCoordinator::OutputsInCas(const BuildResult& result) const {
  if (cas_ == nullptr || result.output_trees_size() != result.outputs_size()) return false;
  for (const auto& [name, tree] : result.output_trees()) {
    if (!cas_->HasDirectory(tree)) return false;
  }
  return true;
}

std::string BuildCoordinator::ResultKey(const kiln::v1::Digest& flake_subtree, const kiln::v1::JobSpec& spec) {
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

uint64_t BuildCoordinator::DedupHash(const kiln::v1::JobSpec& spec) {
  return absl::Hash<std::string>{}(DedupKey(spec));
}

std::string BuildCoordinator::FollowingReason(const std::string& leader) {
  return absl::StrCat("identical to job ", leader, ", already in flight: it will share that job's result");
}

std::string BuildCoordinator::DedupKey(const kiln::v1::JobSpec& spec) {
  std::vector<std::string> features(spec.requirements().required_features().begin(),
                                    spec.requirements().required_features().end());
  std::sort(features.begin(), features.end());
  std::map<std::string, std::string> labels(spec.requirements().pinned_labels().begin(),
                                            spec.requirements().pinned_labels().end());
  std::string key = absl::StrCat(spec.source().tree_root().hash(), "\x1f", spec.source().flake_subdir(), "\x1f",
                                 spec.attr(), "\x1f", spec.requirements().system(), "\x1f",
                                 absl::StrJoin(features, ","), "\x1f");
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

void BuildCoordinator::Admit(JobEntry& job, const JobRecord& record) {
  const std::string& id = record.job_id();
  JobEvent event;
  event.mutable_queued()->set_attempt(record.attempt());
  // In flight by hash of the key (a million keys would cost ~100 MB as
  // strings); a hit is confirmed against the leader's own key.
  const std::string key = DedupKey(record.spec());
  auto [it, fresh] = in_flight_.try_emplace(absl::Hash<std::string>{}(key), id);
  JobRecord scratch;
  if (!fresh && it->second != id && DedupKey(View(jobs_.at(it->second), scratch).spec()) == key) {
    JobEntry& leader = jobs_.at(it->second);
    job.leader = it->second;
    leader.followers.push_back(id);
    event.mutable_queued()->set_reason(FollowingReason(job.leader));
    Emit(id, job, std::move(event));
    return;
  }
  scheduler_.Enqueue(id, RequirementsOf(record.spec()), PlacementOf(record));
  Emit(id, job, std::move(event));
}

absl::Status BuildCoordinator::Recover() {
  absl::StatusOr<StoredCounters> counters = store_->LoadCounters();
  if (!counters.ok()) return counters.status();
  next_job_seq_ = counters->next_job_seq;
  next_buildset_seq_ = counters->next_buildset_seq;
  size_t queued = 0, held = 0;
  // Sized once (ids are dense: the counter bounds the number of jobs):
  // growing maps of a million entries step by step costs rehashing and page
  // faults on every doubling.
  const size_t expected = static_cast<size_t>(next_job_seq_ - 1);
  jobs_.reserve(expected);
  in_flight_.reserve(expected);
  scheduler_.Reserve(expected);
  // One record parsed at a time into the same message (no allocation once
  // warm); the entry keeps the serialized form.
  JobRecord record;
  absl::Status loaded = store_->ForEachPackedJob([&](absl::string_view bytes) {
    if (!record.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      return absl::DataLossError("unreadable job record");
    }
    const std::string& id = record.job_id();
    buildsets_[record.buildset_id()].push_back(id);
    JobEntry& job = jobs_[id];
    job.packed.assign(bytes.data(), bytes.size());
    job.queued_at = clock_->Now();
    const JobState state = record.state();
    if (!IsTerminal(state) && !record.token().empty()) ++active_by_token_[record.token()];
    if (IsTerminal(state)) {
      if (record.stored_log_bytes() > 0) {
        journal_.RecoverStoredLog(id, record.finished_at().seconds(),
                                  static_cast<uint64_t>(record.stored_log_bytes()));
      }
      JobEvent event;
      auto* finished = event.mutable_finished();
      finished->set_state(state);
      *finished->mutable_result() = record.result();
      finished->set_worker(record.worker());
      Emit(id, job, std::move(event));
    } else if (state == kiln::v1::JOB_STATE_QUEUED) {
      Admit(job, record);
      ++queued;
    } else {
      // It was on a worker whose stream died with the old process: hold it
      // for that worker's return, for one lease.
      scheduler_.Reattach(id, record.worker());
      in_flight_.try_emplace(DedupHash(record.spec()), id);
      registry_.Hold(record.worker());
      JobEvent event;
      event.mutable_assigned()->set_worker(record.worker());
      event.mutable_assigned()->set_attempt(record.attempt());
      Emit(id, job, std::move(event));
      ++held;
    }
    return absl::OkStatus();
  });
  if (!loaded.ok()) return loaded;
  journal_.SortRecovered();
  metrics_->stored_log_bytes.Set(static_cast<double>(journal_.stored_log_bytes()));
  LogInfo(kComponent, "recovered ", jobs_.size(), " jobs (", queued, " queued, ", held,
          " held for their workers to reconnect)");
  UpdateGauges();
  return absl::OkStatus();
}

absl::StatusOr<kiln::v1::SubmitBuildResponse> BuildCoordinator::Submit(const kiln::v1::SubmitBuildRequest& request,
                                                                       const std::string& token) {
  auto reject = [&](absl::Status status) {
    metrics_->submissions_rejected.Increment();
    return status;
  };
  // (An empty request is refused for what it is, even while out of space.)
  if (!request.targets().empty() && !EnsureWritable()) return reject(OutOfSpace());
  // Once workers have had time to reconnect after a start, targets none of
  // them could ever build are refused rather than queued forever.
  const bool grace_over = clock_->Now() - started_ >= options_.capability_grace;
  auto active = active_by_token_.find(token);
  absl::StatusOr<CheckedSubmission> checked =
      validator_.Check(request, token, active == active_by_token_.end() ? 0 : active->second,
                       grace_over ? &scheduler_ : nullptr);
  if (!checked.ok()) return reject(checked.status());
  const BlobLookup lookup = checked->Lookup();
  const auto& uploads = checked->uploads;
  const SourceTreeLimits limits{.max_total_bytes = options_.max_source_bytes};
  StateWrite write;
  write.blobs = std::move(checked->blobs);

  // Inline trees go into the CAS like uploaded ones (files, then directories
  // children first), so the next submission of the same tree need not send
  // it. Content-addressed: stored before the jobs, harmless if they fail.
  for (const auto& [root, hashes] : checked->inline_trees) {
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
        CollectTreeDirectories(root, lookup, limits);
    if (!dirs.ok()) return reject(dirs.status());
    absl::flat_hash_set<std::string> dir_hashes;
    for (const auto& [hash, _] : *dirs) dir_hashes.insert(hash);
    absl::Status s;
    // The hashes are known (each blob matched its digest on arrival); the
    // CAS checks them once more as it stores, as it does every upload.
    const auto put = [&](const std::string& hash, const std::string& data, bool is_directory) {
      kiln::v1::Digest digest;
      digest.set_hash(hash);
      digest.set_size_bytes(static_cast<int64_t>(data.size()));
      bool stored = false;
      s = cas_->Put(digest, data, is_directory, &stored);
      if (stored) {
        metrics_->cas_uploaded_blobs.Increment();
        metrics_->cas_uploaded_bytes.Increment(static_cast<double>(data.size()));
      }
    };
    for (const std::string& hash : hashes) {
      if (s.ok() && !dir_hashes.contains(hash)) put(hash, *uploads.at(hash), false);
    }
    for (auto it = dirs->rbegin(); s.ok() && it != dirs->rend(); ++it) put(it->first, it->second, true);
    if (IsDiskFull(s)) {
      MarkUnwritable(s);
      return reject(OutOfSpace());
    }
    if (!s.ok()) {
      metrics_->state_write_errors.Increment();
      return reject(absl::UnavailableError(absl::StrCat("the coordinator could not store the source: ", s.message())));
    }
  }

  // Build every record, store them in one batch, and only then make them live.
  const absl::Time now = clock_->Now();
  const std::string buildset_id = absl::StrCat("b", next_buildset_seq_);
  std::vector<std::pair<std::unique_ptr<JobRecord>, std::string>> records;  // Parsed, serialized.
  records.reserve(request.targets_size());
  for (int i = 0; i < request.targets_size(); ++i) {
    auto owned = std::make_unique<JobRecord>();
    JobRecord& r = *owned;
    r.set_job_id(absl::StrCat(next_job_seq_ + static_cast<uint64_t>(i)));
    r.set_buildset_id(buildset_id);
    *r.mutable_spec() = request.targets(i).spec();
    if (!r.spec().priority_class().empty()) {
      r.mutable_spec()->set_priority(validator_.PriorityOf(r.spec().priority_class()));
    }
    if (r.spec().priority() == kiln::v1::PRIORITY_UNSPECIFIED) {
      r.mutable_spec()->set_priority(kiln::v1::PRIORITY_CI);
    }
    if (!r.spec().has_timeout() && options_.default_timeout > absl::ZeroDuration()) {
      *r.mutable_spec()->mutable_timeout() = ToProtoDuration(options_.default_timeout);
    }
    r.set_state(kiln::v1::JOB_STATE_QUEUED);
    *r.mutable_submitted_at() = ToProtoTime(now);
    r.set_submitter(token.empty() ? request.submitter() : absl::StrCat(request.submitter(), " (token ", token, ")"));
    r.set_token(token);
    // The result cache: an identical target built before ends here, as
    // succeeded, with that build's result.
    // A push is never answered from the cache: its tags may have moved since
    // (a revert must push again). The worker finds the output in its store
    // and the registry has every blob, so it costs a few requests.
    const bool ordinary_build = r.spec().fod_task().mode() == kiln::v1::FodTask::MODE_BUILD && !r.spec().has_push();
    if (std::optional<kiln::v1::Digest> subtree = FlakeSubtree(r.spec().source(), lookup);
        subtree.has_value() && ordinary_build) {
      if (r.spec().rebuild()) {
        metrics_->ResultCacheLookups("bypassed").Increment();
      } else if (absl::StatusOr<kiln::state::v1::CachedResult> hit =
                     store_->GetCachedResult(ResultKey(*subtree, r.spec()));
                 hit.ok() && (!r.spec().fetch_outputs() || OutputsInCas(hit->result()))) {
        // (A result without its outputs in the CAS cannot serve --out-link.)
        metrics_->ResultCacheLookups("hit").Increment();
        r.set_state(kiln::v1::JOB_STATE_SUCCEEDED);
        *r.mutable_result() = hit->result();
        r.mutable_result()->set_cached(true);
        r.mutable_result()->set_cached_from_job(hit->job_id());
        r.set_worker(hit->worker());
        *r.mutable_finished_at() = ToProtoTime(now);
      } else {
        metrics_->ResultCacheLookups("miss").Increment();
      }
    }
    std::string bytes = r.SerializeAsString();
    records.emplace_back(std::move(owned), std::move(bytes));
  }
  for (const auto& [r, bytes] : records) write.packed_jobs.emplace_back(&r->job_id(), &bytes);
  write.next_job_seq = next_job_seq_ + records.size();
  write.next_buildset_seq = next_buildset_seq_ + 1;
  if (absl::Status s = store_->Commit(write); !s.ok()) {
    if (IsDiskFull(s)) {
      MarkUnwritable(s);
      return reject(OutOfSpace());
    }
    metrics_->state_write_errors.Increment();
    LogError(kComponent, "cannot store submission: ", s.ToString());
    return reject(absl::UnavailableError(absl::StrCat("the coordinator could not store the build: ", s.message())));
  }
  next_job_seq_ = write.next_job_seq;
  next_buildset_seq_ = write.next_buildset_seq;

  kiln::v1::SubmitBuildResponse response;
  response.set_buildset_id(buildset_id);
  for (auto& [r, bytes] : records) {
    const std::string id = r->job_id();
    response.add_job_ids(id);
    buildsets_[buildset_id].push_back(id);
    JobEntry& job = jobs_[id];
    job.parsed = std::move(r);
    job.packed = std::move(bytes);
    job.touched = true;
    touched_.push_back(&job);
    job.queued_at = now;
    metrics_->jobs_submitted.Increment();
    if (job.parsed->state() == kiln::v1::JOB_STATE_SUCCEEDED) {
      // From the result cache: finished already, nothing to run.
      metrics_->JobsFinished("succeeded").Increment();
      JobEvent event;
      auto* finished = event.mutable_finished();
      finished->set_state(kiln::v1::JOB_STATE_SUCCEEDED);
      *finished->mutable_result() = job.parsed->result();
      finished->set_worker(job.parsed->worker());
      *finished->mutable_queue_time() = ToProtoDuration(absl::ZeroDuration());
      Emit(id, job, std::move(event));
      continue;
    }
    if (!token.empty()) ++active_by_token_[token];
    Admit(job, *job.parsed);
  }
  LogInfo(kComponent, "buildset ", buildset_id, ": accepted ", records.size(), " job(s) from '",
          request.submitter(), "'");
  EndOfCall();
  return response;
}

absl::Status BuildCoordinator::Watch(const std::string& job_id, uint64_t from_sequence, uint64_t incarnation,
                                     std::shared_ptr<JobWatcher> watcher) {
  Flush();  // The replay below shows only stored states.
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobEntry& job = it->second;
  journal_.Watch(job_id, job.journal, from_sequence, incarnation, std::move(watcher), IsTerminal(Rec(job).state()));
  return absl::OkStatus();
}

void BuildCoordinator::Unwatch(const std::string& job_id, const JobWatcher* watcher) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  journal_.Unwatch(it->second.journal, watcher);
}

absl::StatusOr<JobState> BuildCoordinator::Cancel(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobEntry& job = it->second;
  const JobState state = Rec(job).state();
  if (IsTerminal(state)) return state;
  if (state == kiln::v1::JOB_STATE_QUEUED) {
    scheduler_.Dequeue(job_id);
  } else {
    // The slot stays taken until the worker confirms the build is gone.
    if (WorkerEntry* worker = registry_.ByName(Rec(job).worker()); worker != nullptr) {
      kiln::v1::CoordinatorMessage message;
      message.mutable_cancel()->set_job_id(job_id);
      message.mutable_cancel()->set_attempt(Rec(job).attempt());
      message.mutable_cancel()->set_reason("cancelled by request");
      registry_.Send(*worker, std::move(message));
    }
  }
  BuildResult result;
  result.set_code(kiln::v1::RESULT_CODE_CANCELLED);
  result.set_error_message("cancelled by request");
  Finish(job, kiln::v1::JOB_STATE_CANCELLED, std::move(result));
  UpdateGauges();
  EndOfCall();
  return kiln::v1::JOB_STATE_CANCELLED;
}

absl::StatusOr<kiln::v1::Job> BuildCoordinator::GetJob(const std::string& job_id) const {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord scratch;
  const JobRecord& r = View(it->second, scratch);
  const std::string& leader = it->second.leader;
  kiln::v1::Job job;
  job.set_job_id(r.job_id());
  job.set_buildset_id(r.buildset_id());
  *job.mutable_spec() = r.spec();
  job.set_state(r.state());
  job.set_attempt(r.attempt());
  job.set_worker(r.worker());
  *job.mutable_result() = r.result();
  *job.mutable_submitted_at() = r.submitted_at();
  *job.mutable_finished_at() = r.finished_at();
  job.set_waiting_reason(leader.empty() ? scheduler_.WaitingReason(job_id, clock_->Now()) : FollowingReason(leader));
  return job;
}

absl::StatusOr<kiln::v1::Buildset> BuildCoordinator::GetBuildset(const std::string& buildset_id) const {
  auto it = buildsets_.find(buildset_id);
  if (it == buildsets_.end()) return absl::NotFoundError(absl::StrCat("no buildset ", buildset_id));
  kiln::v1::Buildset out;
  out.set_buildset_id(buildset_id);
  for (const std::string& id : it->second) *out.add_jobs() = *GetJob(id);
  return out;
}

absl::Status BuildCoordinator::GetJobLog(const std::string& job_id, bool have_stored,
                                         kiln::v1::GetJobLogResponse* out) const {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", job_id));
  JobRecord scratch;
  const JobRecord& r = View(it->second, scratch);
  out->set_state(r.state());
  out->set_expired(r.log_expired());
  // A job that built nothing itself points to the job whose build it shared.
  if (!r.log_job_id().empty()) {
    out->set_log_job_id(r.log_job_id());
  } else if (r.result().cached()) {
    out->set_log_job_id(r.result().cached_from_job());
  } else if (!it->second.leader.empty()) {
    out->set_log_job_id(it->second.leader);
  }
  // A finished job's log comes from the store; the copy in memory serves
  // only jobs still running (or one finishing between the caller's read of
  // the store and this call).
  if (have_stored) return absl::OkStatus();
  journal_.AppendLogLines(it->second.journal, *out->mutable_lines());
  out->set_dropped_lines(journal_.dropped_log_lines(it->second.journal));
  return absl::OkStatus();
}

kiln::v1::ListBuildsetsResponse BuildCoordinator::ListBuildsets(size_t limit) const {
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
      auto it = jobs_.find(job_id);
      if (it == jobs_.end()) continue;
      const JobRecord& r = View(it->second, scratch);
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

absl::StatusOr<kiln::v1::Buildset> BuildCoordinator::CancelBuildset(const std::string& buildset_id) {
  auto it = buildsets_.find(buildset_id);
  if (it == buildsets_.end()) return absl::NotFoundError(absl::StrCat("no buildset ", buildset_id));
  for (const std::string& id : it->second) {
    if (absl::StatusOr<JobState> s = Cancel(id); !s.ok()) return s.status();
  }
  return GetBuildset(buildset_id);
}

kiln::v1::ListWorkersResponse BuildCoordinator::ListWorkers() const {
  kiln::v1::ListWorkersResponse out;
  for (const Scheduler::WorkerView& w : scheduler_.Workers()) {
    kiln::v1::WorkerInfo* info = out.add_workers();
    info->set_name(w.name);
    info->set_state(!w.online   ? kiln::v1::WORKER_STATE_DISCONNECTED
                    : w.draining ? kiln::v1::WORKER_STATE_DRAINING
                                 : kiln::v1::WORKER_STATE_CONNECTED);
    for (const auto& x : w.caps.systems) info->add_systems(x);
    for (const auto& x : w.caps.supported_features) info->add_supported_features(x);
    for (const auto& x : w.caps.mandatory_features) info->add_mandatory_features(x);
    info->mutable_labels()->insert(w.caps.labels.begin(), w.caps.labels.end());
    info->set_max_jobs(static_cast<uint32_t>(std::max(0, w.caps.max_jobs)));
    info->set_speed_factor(w.caps.speed_factor);
    for (const auto& j : w.jobs) info->add_running_jobs(j);
    if (const WorkerEntry* worker = registry_.ByName(w.name); worker != nullptr) {
      const WorkerEntry& entry = *worker;
      *info->mutable_last_seen() = ToProtoTime(entry.last_seen);
      info->set_load_average(entry.last_heartbeat.load_average());
      info->set_memory_used_fraction(entry.last_heartbeat.memory_used_fraction());
      info->set_store_free_bytes(entry.last_heartbeat.store_free_bytes());
      info->set_work_dir_free_bytes(entry.last_heartbeat.work_dir_free_bytes());
    }
    if (std::optional<absl::Time> until = registry_.lease_until(w.name); until.has_value()) {
      *info->mutable_lease_until() = ToProtoTime(*until);
    }
    info->set_over_limit(w.over_limit);
  }
  return out;
}

absl::StatusOr<kiln::v1::WorkerInfo> BuildCoordinator::DrainWorker(const std::string& name, bool undo) {
  if (!scheduler_.SetDraining(name, !undo)) return absl::NotFoundError(absl::StrCat("no worker named '", name, "'"));
  registry_.SetDrained(name, !undo);
  LogInfo(ForWorker(name), kComponent, undo ? "drain lifted" : "draining (no new jobs)");
  UpdateGauges();
  EndOfCall();
  kiln::v1::ListWorkersResponse all = ListWorkers();
  for (kiln::v1::WorkerInfo& info : *all.mutable_workers()) {
    if (info.name() == name) return std::move(info);
  }
  return absl::NotFoundError(absl::StrCat("no worker named '", name, "'"));
}

void BuildCoordinator::OnWorkerMessage(const std::shared_ptr<WorkerSession>& session,
                                       const kiln::v1::WorkerMessage& message) {
  WorkerEntry& worker = registry_.Seen(session);
  if (worker.name.empty() && !message.has_register_()) {
    session->Close(absl::FailedPreconditionError("the first message on a worker stream must be Register"));
    registry_.Gone(session.get());
    return;
  }
  switch (message.kind_case()) {
    case kiln::v1::WorkerMessage::kRegister:
      HandleRegister(worker, message.register_());
      break;
    case kiln::v1::WorkerMessage::kHeartbeat:
      HandleHeartbeat(worker, message.heartbeat());  // It also renewed the lease (last_seen, above).
      break;
    case kiln::v1::WorkerMessage::kStarted: {
      JobEntry* job = FindAttempt(worker, message.started().job_id(), message.started().attempt());
      if (job == nullptr || Rec(*job).state() != kiln::v1::JOB_STATE_ASSIGNED) break;
      Rec(*job).set_state(kiln::v1::JOB_STATE_RUNNING);
      *Rec(*job).mutable_started_at() = ToProtoTime(clock_->Now());
      Persist(*job);
      JobEvent event;
      event.mutable_started()->set_worker(worker.name);
      Emit(message.started().job_id(), *job, std::move(event));
      break;
    }
    case kiln::v1::WorkerMessage::kLog: {
      JobEntry* job = FindAttempt(worker, message.log().job_id(), message.log().attempt());
      if (job == nullptr || message.log().lines().empty()) break;
      JobEvent event;
      *event.mutable_log()->mutable_lines() = message.log().lines();
      Emit(message.log().job_id(), *job, std::move(event));
      break;
    }
    case kiln::v1::WorkerMessage::kFinished:
      HandleFinished(worker, message.finished());
      break;
    case kiln::v1::WorkerMessage::KIND_NOT_SET:
      break;
  }
  if (!message.results().empty()) {
    // `worker` is still valid: only Register (above) can drop the entry.
    WorkerEntry* still = registry_.Find(session.get());
    if (still != nullptr && !still->name.empty()) {
      for (const auto& finished : message.results()) HandleFinished(*still, finished);
    }
  }
  UpdateGauges();
  EndOfCall();
}

void BuildCoordinator::HandleRegister(WorkerEntry& worker, const kiln::v1::Register& reg) {
  const WorkerRegistry::Admission admission = registry_.CheckRegister(worker, reg);
  if (!admission.refused.ok()) {
    if (absl::IsAlreadyExists(admission.refused)) {
      LogWarning(ForWorker(reg.name()), kComponent, "refused a second worker with the name of a connected one");
    }
    std::shared_ptr<WorkerSession> session = worker.session;  // `worker` goes with WorkerGone.
    session->Close(admission.refused);
    WorkerGone(session.get());
    return;
  }
  if (admission.replaces != nullptr) {
    registry_.Find(admission.replaces)->session->Close(
        absl::AbortedError("replaced by a newer connection of the same worker"));
    WorkerGone(admission.replaces);
  }
  registry_.Bind(worker, reg);
  scheduler_.AddWorker(worker.name, WorkerRegistry::CapabilitiesOf(reg));
  if (registry_.drained(worker.name)) scheduler_.SetDraining(worker.name, true);
  if (reg.has_initial_load()) HandleHeartbeat(worker, reg.initial_load());
  registry_.Send(worker, registry_.Registered(worker));
  Reconcile(worker, reg);
  LogInfo(ForWorker(worker.name), kComponent, "registered: ", reg.max_jobs(), " slot(s), systems ",
          absl::StrJoin(reg.systems(), ","));
}

bool BuildCoordinator::EnsureWritable() {
  if (state_writable_.load()) return true;
  const absl::Time now = clock_->Now();
  if (now < next_resume_) return false;
  next_resume_ = now + absl::Seconds(1);
  // Not at the first free byte: a few writes would fill it again.
  if (const uint64_t free_bytes = store_->FreeBytes(); free_bytes < options_.resume_min_free_bytes) {
    state_error_ = absl::StrFormat("%d MiB free on its state directory; it resumes at %d MiB", free_bytes >> 20,
                                   options_.resume_min_free_bytes >> 20);
    return false;
  }
  if (absl::Status s = store_->Resume(); !s.ok()) {
    state_error_ = std::string(s.message());
    return false;
  }
  state_writable_.store(true);
  metrics_->state_writable.Set(1);
  LogInfo(kComponent, "state writes resumed");
  return true;
}

void BuildCoordinator::MarkUnwritable(const absl::Status& why) {
  metrics_->state_write_errors.Increment();
  state_error_ = std::string(why.message());
  if (state_writable_.exchange(false)) {
    LogError(kComponent, "state write failed; taking no new work and announcing nothing until writes resume: ",
             why.ToString());
  }
  metrics_->state_writable.Set(0);
  next_resume_ = clock_->Now() + absl::Seconds(1);
}

absl::Status BuildCoordinator::OutOfSpace() const {
  return absl::ResourceExhaustedError(absl::StrCat(
      kCoordinatorOutOfSpace, ": it cannot store new work (", state_error_,
      "); it takes submissions again by itself once space is freed on its state directory"));
}

void BuildCoordinator::Flush() {
  if (flushing_) return;
  // While the store takes no writes, everything waits: the state changes,
  // and the events and messages that would announce them.
  if (!EnsureWritable()) return;
  flushing_ = true;
  Dispatch();  // Every slot freed since the last flush, in one round.
  if (!pending_jobs_.empty()) {
    StateWrite write;
    for (const auto& [key, entry] : pending_results_) write.cached_results.emplace_back(key, &entry);
    journal_.TakeLogWrites(write.logs, write.deleted_logs);
    write.packed_jobs.reserve(pending_jobs_.size());
    for (JobEntry* job : pending_jobs_) {
      job->dirty = false;
      job->parsed->SerializeToString(&job->packed);
      write.packed_jobs.emplace_back(&job->parsed->job_id(), &job->packed);
    }
    if (absl::Status s = store_->Commit(write); !s.ok()) {
      // Kept to be written again once the store resumes; until then nobody
      // hears of these changes, so a restart loses nothing anyone was told.
      for (JobEntry* job : pending_jobs_) job->dirty = true;
      journal_.ReturnLogWrites(write.logs, write.deleted_logs);
      MarkUnwritable(s);
      flushing_ = false;
      return;
    }
    pending_jobs_.clear();
    pending_results_.clear();
  }
  // Queued and finished jobs keep only their serialized record: most jobs
  // are in one of those states, and a parsed record costs ~5 times more.
  for (JobEntry* job : touched_) {
    job->touched = false;
    const JobState state = job->parsed->state();
    if (state == kiln::v1::JOB_STATE_QUEUED || IsTerminal(state)) job->parsed.reset();
  }
  touched_.clear();
  // Stored: now the world may hear of it.
  journal_.Release();
  registry_.DeliverOutboxes();
  flushing_ = false;
}

void BuildCoordinator::HandleHeartbeat(WorkerEntry& worker, const kiln::v1::Heartbeat& heartbeat) {
  const std::string over =
      registry_.Heartbeat(worker, heartbeat, scheduler_.CapabilitiesOf(worker.name).max_jobs);
  const std::string before = scheduler_.OverLimitOf(worker.name);
  if (over != before) {
    if (over.empty()) {
      LogInfo(ForWorker(worker.name), kComponent, "back under its limits");
    } else {
      LogWarning(ForWorker(worker.name), kComponent, "takes no new jobs: ", over);
    }
    scheduler_.SetOverLimit(worker.name, over);
  }
}

void BuildCoordinator::Reconcile(WorkerEntry& worker, const kiln::v1::Register& reg) {
  absl::flat_hash_map<std::string, uint32_t> reported;
  for (const auto& r : reg.running()) reported[r.job_id()] = r.attempt();
  size_t kept = 0;
  for (const std::string& id : scheduler_.JobsOf(worker.name)) {
    JobEntry& job = jobs_.at(id);
    auto it = reported.find(id);
    if (it != reported.end() && it->second == Rec(job).attempt()) {
      reported.erase(it);  // Still running there (or its result is on the way): keep it.
      ++kept;
      continue;
    }
    scheduler_.Release(id, worker.name);
    Requeue(job, "worker_lost", absl::StrCat("worker ", worker.name, " came back without it"));
  }
  if (kept > 0) LogInfo(ForWorker(worker.name), kComponent, "re-attached ", kept, " job(s)");
  // Anything else it has is not its to run any more (requeued, finished or
  // cancelled meanwhile): stop it.
  for (const auto& [id, attempt] : reported) {
    kiln::v1::CoordinatorMessage cancel;
    cancel.mutable_cancel()->set_job_id(id);
    cancel.mutable_cancel()->set_attempt(attempt);
    cancel.mutable_cancel()->set_reason("the job is no longer this worker's attempt");
    registry_.Send(worker, std::move(cancel));
  }
}

void BuildCoordinator::ExpireLease(const std::string& worker, const std::string& why) {
  registry_.EndLease(worker);
  const std::vector<std::string> lost = scheduler_.RemoveWorker(worker);
  LogInfo(ForWorker(worker), kComponent, why, "; requeueing ", lost.size(), " job(s)");
  for (const std::string& id : lost) {
    auto job = jobs_.find(id);
    if (job != jobs_.end() && !IsTerminal(Rec(job->second).state())) {
      Requeue(job->second, "lease_expired", absl::StrCat("worker ", worker, " ", why));
    }
  }
}

absl::StatusOr<uint64_t> BuildCoordinator::CollectGarbage() {
  if (cas_ == nullptr) return 0;
  last_gc_ = clock_->Now();
  // Everything the trees of queued and running jobs name is kept.
  absl::flat_hash_set<std::string> roots, keep;
  JobRecord scratch;
  scheduler_.ForEachLiveJob([&](const std::string& id) {
    auto it = jobs_.find(id);
    if (it != jobs_.end()) roots.insert(View(it->second, scratch).spec().source().tree_root().SerializeAsString());
  });
  absl::flat_hash_map<std::string, std::string> read;
  const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    if (auto it = read.find(hash); it != read.end()) return &it->second;
    absl::StatusOr<std::string> blob = cas_->ReadAll(hash);
    if (!blob.ok()) return nullptr;
    return &read.emplace(hash, *std::move(blob)).first->second;
  };
  SourceTreeLimits limits;
  limits.max_total_bytes = UINT64_MAX;
  limits.max_entries = uint64_t{1} << 26;
  limits.max_entries_per_directory = uint64_t{1} << 20;
  for (const std::string& serialized : roots) {
    kiln::v1::Digest root;
    root.ParseFromString(serialized);
    absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
        CollectTreeDirectories(root, lookup, limits);
    if (!dirs.ok()) continue;  // Already incomplete: nothing of it to save.
    for (const auto& [hash, data] : *dirs) {
      keep.insert(hash);
      kiln::v1::Directory dir;
      if (!dir.ParseFromString(data)) continue;
      for (const auto& f : dir.files()) keep.insert(f.digest().hash());
    }
    read.clear();
  }
  const uint64_t target = options_.cas_max_bytes / 10 * 9;
  absl::StatusOr<uint64_t> freed =
      // Blob times are wall-clock times (the CAS's own), not the scheduler clock.
      cas_->CollectGarbage(keep, absl::ToUnixSeconds(absl::Now() - options_.cas_gc_grace), target);
  if (freed.ok()) {
    metrics_->cas_gc_runs.Increment();
    metrics_->cas_gc_freed_bytes.Increment(static_cast<double>(*freed));
    LogInfo(kComponent, "CAS garbage collection: freed ", *freed, " bytes, ", cas_->total_bytes(),
            " bytes stored, ", keep.size(), " blob(s) of ", roots.size(), " live tree(s) kept");
  } else {
    LogError(kComponent, "CAS garbage collection failed: ", freed.status().ToString());
  }
  return freed;
}

void BuildCoordinator::Tick() {
  CheckLeases();
  FailWhatNoKnownWorkerCanBuild();
  if (cas_ != nullptr && options_.cas_max_bytes > 0 && cas_->total_bytes() > options_.cas_max_bytes &&
      clock_->Now() - last_gc_ >= options_.cas_gc_interval) {
    CollectGarbage().IgnoreError();  // Logged and counted.
  }
  EndOfCall();
}

void BuildCoordinator::FailWhatNoKnownWorkerCanBuild() {
  // Jobs submitted while workers were still reconnecting after a start were
  // not checked against them; once the window is over they are, once, as a
  // new submission would be, instead of waiting forever.
  if (grace_checked_ || clock_->Now() - started_ < options_.capability_grace || !scheduler_.has_known_workers()) {
    return;
  }
  grace_checked_ = true;
  std::vector<std::string> queued;
  scheduler_.ForEachLiveJob([&](const std::string& id) { queued.push_back(id); });
  for (const std::string& id : queued) {
    auto it = jobs_.find(id);
    if (it == jobs_.end() || Rec(it->second).state() != kiln::v1::JOB_STATE_QUEUED) continue;
    const std::string unmet = scheduler_.UnmetByKnownWorkers(RequirementsOf(Rec(it->second).spec()));
    if (unmet.empty()) continue;
    scheduler_.Dequeue(id);
    BuildResult result;
    result.set_code(kiln::v1::RESULT_CODE_BUILD_FAILED);
    result.set_error_message(absl::StrCat(Rec(it->second).spec().display_name(), ": ", unmet));
    LogWarning(ForJob(id), kComponent, "fails: ", result.error_message());
    Finish(it->second, kiln::v1::JOB_STATE_FAILED, std::move(result));
  }
}

void BuildCoordinator::CheckLeases() {
  // A stream that stays open but carries nothing (a dead peer behind a
  // half-open connection) ends here; its lease then runs from last_seen.
  const std::vector<const WorkerSession*> silent = registry_.Silent();
  for (const WorkerSession* session : silent) {
    WorkerEntry* worker = registry_.Find(session);
    if (worker == nullptr) continue;
    worker->session->Close(absl::DeadlineExceededError("no message from the worker within the lease"));
    WorkerGone(session);  // Its lease ran from last_seen: it expires there and then.
  }
  const std::vector<std::string> expired = registry_.ExpiredLeases();
  for (const std::string& name : expired) ExpireLease(name, registry_.LeaseExpiredReason());
  // Flush (by the caller) also places jobs whose retry back-off ended.
  if (!silent.empty() || !expired.empty() || gauges_dirty_) UpdateGauges(/*force=*/true);
}

BuildCoordinator::JobEntry* BuildCoordinator::FindAttempt(const WorkerEntry& worker,
                                                          const std::string& job_id, uint32_t attempt) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return nullptr;
  JobEntry& job = it->second;
  // Fencing: only the current attempt on the worker it was given to counts.
  if (Rec(job).worker() != worker.name || Rec(job).attempt() != attempt ||
      IsTerminal(Rec(job).state())) {
    return nullptr;
  }
  return &job;
}

void BuildCoordinator::HandleFinished(WorkerEntry& worker, const kiln::v1::JobFinished& finished) {
  // Stored below or ignored as stale: either way the worker may forget it.
  // The acknowledgement goes with the next message to the worker.
  registry_.Ack(worker, finished.job_id(), finished.attempt());
  auto it = jobs_.find(finished.job_id());
  if (it == jobs_.end()) return;
  JobEntry& job = it->second;
  if (Rec(job).worker() != worker.name || Rec(job).attempt() != finished.attempt()) {
    LogFields about = ForJob(finished.job_id(), finished.attempt());
    about.worker = worker.name;
    LogDebug(about, kComponent, "ignoring a stale result");
    return;
  }
  scheduler_.Release(finished.job_id(), worker.name);
  if (IsTerminal(Rec(job).state())) return;  // Cancelled meanwhile.

  const BuildResult& result = finished.result();
  if (Rec(job).has_started_at()) {
    metrics_->build_duration.Observe(
        absl::ToDoubleSeconds(clock_->Now() - FromProtoTime(Rec(job).started_at())));
  }
  switch (result.code()) {
    case kiln::v1::RESULT_CODE_SUCCEEDED:
      Finish(job, kiln::v1::JOB_STATE_SUCCEEDED, result);
      break;
    case kiln::v1::RESULT_CODE_CANCELLED:
      Finish(job, kiln::v1::JOB_STATE_CANCELLED, result);
      break;
    case kiln::v1::RESULT_CODE_INFRA_ERROR:
      Requeue(job, "infra_error", absl::StrCat("worker ", worker.name, " could not run it: ", result.error_message()),
              /*backoff=*/true);
      break;
    default:
      Finish(job, kiln::v1::JOB_STATE_FAILED, result);
      break;
  }
}

void BuildCoordinator::OnWorkerGone(const WorkerSession* session) {
  WorkerGone(session);
  EndOfCall();
}

void BuildCoordinator::WorkerGone(const WorkerSession* session) {
  std::optional<WorkerRegistry::Departure> departed = registry_.Gone(session);
  if (!departed.has_value()) return;
  // Hold its jobs: a worker that comes back within the lease keeps them.
  scheduler_.SetOnline(departed->name, false);
  LogInfo(kComponent, "worker ", departed->name, " disconnected; holding its ",
          scheduler_.JobsOf(departed->name).size(), " job(s) until ", absl::FormatTime(departed->lease_until));
  // A lease already over (zero, or a silent worker's) expires at once. Not
  // through CheckLeases: that may be our caller, looping over sessions.
  if (departed->lease_over) ExpireLease(departed->name, registry_.LeaseExpiredReason());
  UpdateGauges(/*force=*/departed->lease_over);
}

void BuildCoordinator::CloseAll() {
  Flush();
  const absl::Status shutting_down = absl::UnavailableError("the coordinator is shutting down");
  for (auto& [_, job] : jobs_) journal_.CloseWatchers(job.journal, shutting_down);
  registry_.CloseAll(shutting_down);
}

void BuildCoordinator::Dispatch() {
  const absl::Time round_start = absl::Now();
  std::vector<Assignment> assignments = scheduler_.Assign(clock_->Now());
  if (assignments.empty()) return;
  auto observe = absl::MakeCleanup(
      [&] { metrics_->dispatch_duration.Observe(absl::ToDoubleSeconds(absl::Now() - round_start)); });
  const absl::Time now = clock_->Now();
  for (const Assignment& a : assignments) {
    JobEntry& job = jobs_.at(a.job);
    JobRecord& r = Rec(job);
    r.set_state(kiln::v1::JOB_STATE_ASSIGNED);
    r.set_attempt(r.attempt() + 1);
    r.set_worker(a.worker);
    Persist(job);  // Announced after the flush's write.
    metrics_->queue_wait.Observe(absl::ToDoubleSeconds(now - job.queued_at));
  }
  for (const Assignment& a : assignments) {
    JobEntry& job = jobs_.at(a.job);
    kiln::v1::CoordinatorMessage message;
    auto* assign = message.mutable_assign();
    assign->set_job_id(a.job);
    assign->set_attempt(Rec(job).attempt());
    *assign->mutable_spec() = Rec(job).spec();
    if (absl::Status s = AttachSource(Rec(job).spec(), *assign); !s.ok()) {
      LogError(ForJob(a.job), kComponent, "source unavailable: ", s.ToString());
      scheduler_.Release(a.job, a.worker);
      BuildResult result;
      result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
      result.set_error_message(absl::StrCat("the coordinator lost the job's source: ", s.message()));
      Finish(job, kiln::v1::JOB_STATE_FAILED, std::move(result));
      continue;
    }
    JobEvent event;
    event.mutable_assigned()->set_worker(a.worker);
    event.mutable_assigned()->set_attempt(Rec(job).attempt());
    Emit(a.job, job, std::move(event));
    WorkerEntry* worker = registry_.ByName(a.worker);
    KILN_CHECK(worker != nullptr);  // The scheduler places only on connected workers.
    registry_.Assign(*worker, std::move(*message.mutable_assign()));
  }
}

absl::Status BuildCoordinator::AttachSource(const kiln::v1::JobSpec& spec, kiln::v1::Assignment& assign) {
  const std::string& root = spec.source().tree_root().hash();
  auto cached = tree_blobs_.find(root);
  if (cached == tree_blobs_.end()) {
    // node_hash_map: the lookup hands out pointers that must survive inserts.
    absl::node_hash_map<std::string, std::string> fetched;
    absl::Status read_error;
    const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
      if (auto it = fetched.find(hash); it != fetched.end()) return &it->second;
      absl::StatusOr<std::string> blob = cas_ != nullptr ? cas_->ReadAll(hash) : store_->GetBlob(hash);
      if (!blob.ok()) {
        if (!absl::IsNotFound(blob.status())) read_error = blob.status();
        return nullptr;
      }
      return &fetched.emplace(hash, *std::move(blob)).first->second;
    };
    // A large uploaded tree: its directories only; the worker fetches the
    // files its cache lacks from the CAS.
    absl::StatusOr<kiln::state::v1::BlobMeta> meta =
        cas_ != nullptr ? cas_->Meta(root) : absl::NotFoundError("no CAS");
    const bool directories_only =
        meta.ok() && meta->is_directory() && static_cast<uint64_t>(meta->tree_bytes()) > options_.inline_source_bytes;
    absl::StatusOr<std::vector<std::string>> hashes;
    if (directories_only) {
      SourceTreeLimits limits;
      limits.max_total_bytes = options_.max_tree_bytes;
      absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
          CollectTreeDirectories(spec.source().tree_root(), lookup, limits);
      if (dirs.ok()) {
        hashes.emplace();
        for (const auto& [hash, _] : *dirs) hashes->push_back(hash);
      } else {
        hashes = dirs.status();
      }
    } else {
      hashes = ListTreeBlobs(spec.source().tree_root(), lookup,
                             {.max_total_bytes = std::max<uint64_t>(options_.max_source_bytes,
                                                                    options_.inline_source_bytes)});
    }
    if (!read_error.ok()) return read_error;
    if (!hashes.ok()) return hashes.status();
    auto blobs = std::make_shared<std::vector<kiln::v1::Blob>>();
    size_t bytes = 0;
    for (const std::string& hash : *hashes) {
      std::string& data = fetched.at(hash);
      kiln::v1::Blob& blob = blobs->emplace_back();
      blob.mutable_digest()->set_hash(hash);
      blob.mutable_digest()->set_size_bytes(static_cast<int64_t>(data.size()));
      bytes += data.size();
      blob.set_data(std::move(data));
    }
    // The jobs of a buildset share a tree: keep the recent trees' blobs
    // rather than read and walk them again for every assignment. Bounded.
    if (tree_blobs_.size() >= kCachedTrees || tree_blob_bytes_ + bytes > kCachedTreeBytes) {
      tree_blobs_.clear();
      tree_blob_bytes_ = 0;
    }
    tree_blob_bytes_ += bytes;
    cached = tree_blobs_.emplace(root, std::move(blobs)).first;
  }
  for (const kiln::v1::Blob& blob : *cached->second) *assign.add_blobs() = blob;
  return absl::OkStatus();
}

void BuildCoordinator::Requeue(JobEntry& job, absl::string_view reason_label, const std::string& reason,
                               bool backoff) {
  const std::string id = Rec(job).job_id();
  if (Rec(job).attempt() >= options_.max_attempts) {
    BuildResult result;
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(absl::StrCat("gave up after ", Rec(job).attempt(), " attempts; last: ", reason));
    Finish(job, kiln::v1::JOB_STATE_FAILED, std::move(result));
    return;
  }
  Rec(job).set_state(kiln::v1::JOB_STATE_QUEUED);
  Rec(job).set_requeue_reason(reason);
  Rec(job).clear_started_at();
  Persist(job);
  job.queued_at = clock_->Now();
  JobPlacement placement = PlacementOf(Rec(job));
  if (backoff && options_.retry_backoff > absl::ZeroDuration()) {
    const int doublings = static_cast<int>(std::min<uint32_t>(Rec(job).attempt(), 7)) - 1;
    placement.not_before =
        clock_->Now() + std::min(options_.retry_backoff * (1 << std::max(0, doublings)), absl::Minutes(5));
  }
  scheduler_.Enqueue(id, RequirementsOf(Rec(job).spec()), std::move(placement), /*front=*/true);
  metrics_->Requeues(reason_label).Increment();
  JobEvent event;
  event.mutable_queued()->set_attempt(Rec(job).attempt());
  event.mutable_queued()->set_reason(reason);
  Emit(id, job, std::move(event));
}

void BuildCoordinator::Finish(JobEntry& job, JobState state, BuildResult result) {
  const std::string id = Rec(job).job_id();
  if (!job.leader.empty()) {
    // A follower ends on its own only when cancelled: it stops following.
    auto& others = jobs_.at(job.leader).followers;
    others.erase(std::remove(others.begin(), others.end(), id), others.end());
    job.leader.clear();
  } else if (auto f = in_flight_.find(DedupHash(Rec(job).spec())); f != in_flight_.end() && f->second == id) {
    in_flight_.erase(f);
  }
  std::vector<std::string> followers = std::move(job.followers);
  job.followers.clear();
  // Once per push that ran, not per job that followed it.
  if (result.has_push()) CountPush(*metrics_, result.push());
  FinishOne(job, state, std::move(result));
  if (followers.empty()) return;
  const JobRecord& done = Rec(jobs_.at(id));
  if (state == kiln::v1::JOB_STATE_CANCELLED) {
    // Someone else still wants this build: the first follower leads now.
    for (const std::string& f : followers) {
      JobEntry& next = jobs_.at(f);
      next.leader.clear();
      Admit(next, Rec(next));
    }
    return;
  }
  for (const std::string& f : followers) {
    JobEntry& follower = jobs_.at(f);
    follower.leader.clear();
    Rec(follower).set_worker(done.worker());
    Rec(follower).set_attempt(done.attempt());
    Rec(follower).set_log_job_id(id);
    FinishOne(follower, state, done.result());
  }
}

void BuildCoordinator::FinishOne(JobEntry& job, JobState state, BuildResult result) {
  if (const std::string& token = Rec(job).token(); !token.empty() && !IsTerminal(Rec(job).state())) {
    if (auto it = active_by_token_.find(token); it != active_by_token_.end() && --it->second == 0) {
      active_by_token_.erase(it);
    }
  }
  Rec(job).set_state(state);
  *Rec(job).mutable_result() = std::move(result);
  *Rec(job).mutable_finished_at() = ToProtoTime(clock_->Now());
  StoreLog(job);
  Persist(job);
  const JobRecord& done = Rec(job);
  // For the result cache, stored with the job's final state. The key is
  // computed again rather than kept in every queued job (66 bytes each).
  const BlobLookup none = [](const std::string&) -> const std::string* { return nullptr; };
  std::optional<kiln::v1::Digest> subtree;
  if (state == kiln::v1::JOB_STATE_SUCCEEDED && !done.result().cached() &&
      done.spec().fod_task().mode() == kiln::v1::FodTask::MODE_BUILD) {
    subtree = FlakeSubtree(done.spec().source(), none);
  }
  if (subtree.has_value()) {
    const std::string key = ResultKey(*subtree, done.spec());
    kiln::state::v1::CachedResult entry;
    *entry.mutable_result() = done.result();
    entry.set_job_id(done.job_id());
    entry.set_worker(done.worker());
    *entry.mutable_finished_at() = done.finished_at();
    // Followers of the job have the same key: one entry is enough.
    if (pending_results_.empty() || pending_results_.back().first != key) {
      pending_results_.emplace_back(key, std::move(entry));
    }
  }
  metrics_->JobsFinished(ResultLabel(state)).Increment();
  JobEvent event;
  auto* finished = event.mutable_finished();
  finished->set_state(state);
  *finished->mutable_result() = Rec(job).result();
  finished->set_worker(Rec(job).worker());
  *finished->mutable_queue_time() =
      ToProtoDuration(FromProtoTime(Rec(job).finished_at()) - FromProtoTime(Rec(job).submitted_at()));
  Emit(Rec(job).job_id(), job, std::move(event));
  journal_.Finished(job.journal);
  LogInfo(ForJob(Rec(job).job_id()), kComponent, "(", Rec(job).spec().display_name(), ") ", ResultLabel(state),
          Rec(job).worker().empty() ? "" : " on ", Rec(job).worker());
}

void BuildCoordinator::StoreLog(JobEntry& job) {
  JobJournal::StoredLog stored = journal_.StoreLog(Rec(job).job_id(), job.journal);
  if (stored.bytes > 0) Rec(job).set_stored_log_bytes(stored.bytes);
  for (const std::string& id : stored.expired) {
    auto old = jobs_.find(id);
    if (old == jobs_.end()) continue;
    JobRecord& r = Rec(old->second);
    r.set_stored_log_bytes(0);
    r.set_log_expired(true);
    Persist(old->second);
    metrics_->logs_expired.Increment();
  }
  metrics_->stored_log_bytes.Set(static_cast<double>(journal_.stored_log_bytes()));
}

void BuildCoordinator::Emit(const std::string& id, JobEntry& job, JobEvent event) {
  journal_.Append(id, job.journal, std::move(event));
}

JobRecord& BuildCoordinator::Rec(JobEntry& job) {
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

const JobRecord& BuildCoordinator::View(const JobEntry& job, JobRecord& scratch) {
  if (job.parsed) return *job.parsed;
  KILN_CHECK(scratch.ParseFromString(job.packed));
  return scratch;
}

void BuildCoordinator::Persist(JobEntry& job) {
  KILN_CHECK(job.parsed != nullptr);  // Changed through Rec().
  if (job.dirty) return;
  job.dirty = true;
  pending_jobs_.push_back(&job);
}

void BuildCoordinator::UpdateGauges(bool force) {
  // Gauges are scraped every few seconds; refreshing them after every
  // message would cost O(workers) per message under load.
  const absl::Time now = absl::Now();
  if (!force && now - gauges_updated_ < absl::Milliseconds(100)) {
    gauges_dirty_ = true;
    return;
  }
  gauges_updated_ = now;
  gauges_dirty_ = false;
  // Every series set before is set again (to 0 when empty), so none goes stale.
  absl::flat_hash_map<std::pair<int, std::string>, int64_t> queued;
  for (const auto& key : queued_series_) queued[key] = 0;
  const std::set<std::string> systems = scheduler_.KnownSystems();
  for (int cls = 0; cls < kPriorityClasses; ++cls) {
    // "other" always, so the series exist from the first scrape, before any
    // worker has said which systems it builds for.
    queued[{cls, "other"}] = 0;
    for (const std::string& system : systems) queued[{cls, system}] = 0;
  }
  for (const auto& [key, n] : scheduler_.queued_by_class_system()) {
    queued[{key.first, systems.contains(key.second) ? key.second : "other"}] += n;
  }
  for (const auto& [key, n] : queued) {
    queued_series_.insert(key);
    metrics_->JobsQueued(options_.priority_names[key.first], key.second).Set(static_cast<double>(n));
  }
  metrics_->jobs_running.Set(static_cast<double>(scheduler_.running()));
  size_t by_state[3] = {0, 0, 0};  // connected, draining, disconnected
  for (const Scheduler::WorkerView& w : scheduler_.Workers()) ++by_state[!w.online ? 2 : w.draining ? 1 : 0];
  metrics_->Workers("connected").Set(static_cast<double>(by_state[0]));
  metrics_->Workers("draining").Set(static_cast<double>(by_state[1]));
  metrics_->Workers("disconnected").Set(static_cast<double>(by_state[2]));
  metrics_->slots.Set(static_cast<double>(scheduler_.total_slots()));
  metrics_->slots_used.Set(static_cast<double>(scheduler_.used_slots()));
  if (cas_ != nullptr) metrics_->cas_stored_bytes.Set(static_cast<double>(cas_->total_bytes()));
}

}  // namespace kiln
