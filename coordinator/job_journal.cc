#include "coordinator/job_journal.h"

#include <algorithm>

#include "common/check.h"
#include "common/grpc_util.h"
#include "coordinator/job_log.h"
#include "google/protobuf/io/coded_stream.h"

namespace kiln {
namespace {

using kiln::v1::JobEvent;

// A job's event history is one string: per event, its serialized size as a
// varint, then the serialized JobEvent.
void AppendStoredEvent(std::string& history, const JobEvent& event) {
  const size_t size = event.ByteSizeLong();
  uint8_t prefix[5];  // A varint of 32 bits takes at most 5 bytes.
  uint8_t* end = google::protobuf::io::CodedOutputStream::WriteVarint32ToArray(static_cast<uint32_t>(size), prefix);
  history.append(reinterpret_cast<const char*>(prefix), static_cast<size_t>(end - prefix));
  history.resize(history.size() + size);
  event.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(history.data()) + (history.size() - size));
}

template <typename Fn>
void ForEachStoredEvent(const std::string& history, Fn fn) {
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(history.data()),
                                            static_cast<int>(history.size()));
  JobEvent event;
  uint32_t size = 0;
  while (in.ReadVarint32(&size)) {
    const auto limit = in.PushLimit(static_cast<int>(size));
    event.Clear();
    // Written by AppendStoredEvent in this process.
    KILN_CHECK(event.ParseFromCodedStream(&in) && in.ConsumedEntireMessage());
    in.PopLimit(limit);
    fn(event);
  }
}

}  // namespace

JobJournal::JobJournal(const Clock* clock, uint64_t incarnation, JobJournalOptions options)
    : clock_(clock), incarnation_(incarnation), options_(options) {}

void JobJournal::Append(const std::string& job_id, Entry& entry, JobEvent event) {
  event.set_sequence(entry.next_sequence++);
  *event.mutable_time() = ToProtoTime(clock_->Now());
  if (!entry.watchers.empty()) {
    JobEvent live = event;
    live.set_job_id(job_id);
    live.set_incarnation(incarnation_);
    for (auto& w : entry.watchers) pending_calls_.push_back({w, false, live});
  }
  const size_t before = entry.history.size();
  AppendStoredEvent(entry.history, event);
  if (event.has_log()) {
    const size_t bytes = entry.history.size() - before;
    if (entry.log_bytes + bytes > options_.log_bytes_per_job) {
      entry.history.resize(before);  // Live watchers only.
      entry.dropped_log_lines += static_cast<uint32_t>(event.log().lines_size());
      return;
    }
    entry.log_bytes += static_cast<uint32_t>(bytes);
  }
}

void JobJournal::Watch(const std::string& job_id, Entry& entry, uint64_t from_sequence, uint64_t incarnation,
                       std::shared_ptr<JobWatcher> watcher, bool finished) {
  if (incarnation != incarnation_) from_sequence = 0;  // Sequences restarted with this process.
  ForEachStoredEvent(entry.history, [&](JobEvent& event) {
    if (event.sequence() < from_sequence) return;
    event.set_job_id(job_id);
    event.set_incarnation(incarnation_);
    watcher->OnEvent(event);
  });
  if (finished) {
    watcher->Close(absl::OkStatus());
  } else {
    entry.watchers.push_back(std::move(watcher));
  }
}

void JobJournal::Unwatch(Entry& entry, const JobWatcher* watcher) {
  auto& w = entry.watchers;
  w.erase(std::remove_if(w.begin(), w.end(), [&](const auto& p) { return p.get() == watcher; }), w.end());
}

void JobJournal::AppendLogLines(const Entry& entry, google::protobuf::RepeatedPtrField<kiln::v1::LogLine>& out) const {
  ForEachStoredEvent(entry.history, [&](JobEvent& e) {
    if (!e.has_log()) return;
    for (kiln::v1::LogLine& line : *e.mutable_log()->mutable_lines()) *out.Add() = std::move(line);
  });
}

JobJournal::StoredLog JobJournal::StoreLog(const std::string& job_id, Entry& entry) {
  StoredLog out;
  kiln::state::v1::StoredLog log;
  AppendLogLines(entry, *log.mutable_lines());
  log.set_dropped_lines(entry.dropped_log_lines);
  if (log.lines().empty() && log.dropped_lines() == 0) return out;
  std::string bytes = EncodeStoredLog(log);
  out.bytes = static_cast<int64_t>(bytes.size());
  stored_log_bytes_ += bytes.size();
  stored_logs_.emplace_back(job_id, bytes.size());
  pending_logs_.emplace_back(job_id, std::move(bytes));
  // Oldest first; the newest log stays even alone over the limit.
  while (stored_log_bytes_ > options_.log_retention_bytes && stored_logs_.size() > 1) {
    auto [old, size] = std::move(stored_logs_.front());
    stored_logs_.pop_front();
    stored_log_bytes_ -= std::min(stored_log_bytes_, size);
    pending_log_deletes_.push_back(old);
    out.expired.push_back(std::move(old));
  }
  return out;
}

void JobJournal::Finished(Entry& entry) {
  for (auto& w : entry.watchers) pending_calls_.push_back({std::move(w), true, {}});
  entry.watchers.clear();
  // Keep full logs only for the most recently finished jobs.
  finished_with_logs_.push_back(&entry);
  if (finished_with_logs_.size() <= options_.finished_jobs_with_logs) return;
  Entry* old = finished_with_logs_.front();
  finished_with_logs_.pop_front();
  if (old->log_bytes == 0) return;
  std::string kept;
  ForEachStoredEvent(old->history, [&](JobEvent& e) {
    if (!e.has_log()) AppendStoredEvent(kept, e);
  });
  old->history = std::move(kept);
  old->log_bytes = 0;
}

void JobJournal::RecoverStoredLog(const std::string& job_id, int64_t finished_at_seconds, uint64_t bytes) {
  stored_log_bytes_ += bytes;
  recovered_.push_back({finished_at_seconds, {job_id, bytes}});
}

void JobJournal::SortRecovered() {
  std::stable_sort(recovered_.begin(), recovered_.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [finished, log] : recovered_) stored_logs_.push_back(std::move(log));
  recovered_.clear();
  recovered_.shrink_to_fit();
}

void JobJournal::TakeLogWrites(std::vector<std::pair<std::string, std::string>>& logs,
                               std::vector<std::string>& deletes) {
  logs.swap(pending_logs_);
  deletes.swap(pending_log_deletes_);
}

void JobJournal::ReturnLogWrites(std::vector<std::pair<std::string, std::string>>& logs,
                                 std::vector<std::string>& deletes) {
  // Anything added since goes after what was taken.
  logs.insert(logs.end(), std::make_move_iterator(pending_logs_.begin()), std::make_move_iterator(pending_logs_.end()));
  deletes.insert(deletes.end(), pending_log_deletes_.begin(), pending_log_deletes_.end());
  pending_logs_ = std::move(logs);
  pending_log_deletes_ = std::move(deletes);
  logs.clear();
  deletes.clear();
}

void JobJournal::Release() {
  std::vector<PendingCall> calls;
  calls.swap(pending_calls_);
  for (PendingCall& call : calls) {
    if (call.close) {
      call.watcher->Close(absl::OkStatus());
    } else {
      call.watcher->OnEvent(call.event);
    }
  }
}

void JobJournal::CloseWatchers(Entry& entry, const absl::Status& status) {
  for (auto& w : entry.watchers) w->Close(status);
  entry.watchers.clear();
}

}  // namespace kiln
