#include "worker/farm_uploading_executor.h"

#include <algorithm>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/parallel_for.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// The missing paths in waves: a path's references among them are all in
// earlier waves, so the paths of one wave can go at once.
std::vector<std::vector<const kiln::v1::PathInfo*>> Waves(const std::vector<const kiln::v1::PathInfo*>& missing) {
  absl::flat_hash_map<std::string, const kiln::v1::PathInfo*> by_path;
  for (const kiln::v1::PathInfo* info : missing) by_path[info->store_path()] = info;
  absl::flat_hash_map<std::string, int> wave_of;
  // Depth-first, iterative: a closure can be deep (a long chain of paths).
  for (const kiln::v1::PathInfo* root : missing) {
    std::vector<std::pair<const kiln::v1::PathInfo*, bool>> stack = {{root, false}};
    while (!stack.empty()) {
      auto [info, expanded] = stack.back();
      stack.pop_back();
      if (wave_of.contains(info->store_path())) continue;
      if (!expanded) {
        stack.push_back({info, true});
        for (const std::string& r : info->references()) {
          auto it = by_path.find(r);
          if (it != by_path.end() && r != info->store_path() && !wave_of.contains(r))
            stack.push_back({it->second, false});
        }
        continue;
      }
      int wave = 0;
      for (const std::string& r : info->references()) {
        if (r == info->store_path()) continue;
        if (auto it = wave_of.find(r); it != wave_of.end()) wave = std::max(wave, it->second + 1);
      }
      wave_of[info->store_path()] = wave;
    }
  }
  std::vector<std::vector<const kiln::v1::PathInfo*>> waves;
  for (const kiln::v1::PathInfo* info : missing) {
    const int w = wave_of[info->store_path()];
    if (waves.size() <= static_cast<size_t>(w)) waves.resize(w + 1);
    waves[w].push_back(info);
  }
  return waves;
}

// One attempt: ask, then send what is missing.
absl::Status UploadOnce(const std::vector<kiln::v1::PathInfo>& closure, LocalStore& local, FarmStoreClient& farm,
                        int parallel, FarmUploadReport& report) {
  std::vector<std::string> paths;
  paths.reserve(closure.size());
  for (const kiln::v1::PathInfo& info : closure) paths.push_back(info.store_path());
  ASSIGN_OR_RETURN(std::vector<std::string> missing_paths, farm.Missing(paths));
  const absl::flat_hash_set<std::string> missing_set(missing_paths.begin(), missing_paths.end());
  std::vector<const kiln::v1::PathInfo*> missing;
  for (const kiln::v1::PathInfo& info : closure) {
    if (missing_set.contains(info.store_path())) missing.push_back(&info);
  }
  for (const std::vector<const kiln::v1::PathInfo*>& wave : Waves(missing)) {
    absl::Mutex mu;
    RETURN_IF_ERROR(ParallelFor(wave.size(), parallel, [&](size_t i) -> absl::Status {
      const kiln::v1::PathInfo& info = *wave[i];
      RETURN_IF_ERROR_CONTEXT(farm.AddPath(info, [&](NarSink sink) { return local.DumpNar(info.store_path(), sink); }),
                              "sending ", info.store_path());
      absl::MutexLock lock(&mu);
      ++report.paths_sent;
      report.nar_bytes_sent += info.nar_size();
      return absl::OkStatus();
    }));
  }
  return absl::OkStatus();
}

}  // namespace

bool UploadRetryable(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kFailedPrecondition:  // A reference went missing meanwhile.
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown: return true;
    default: return false;
  }
}

absl::StatusOr<FarmUploadReport> UploadClosure(const std::vector<std::string>& roots, LocalStore& local,
                                               FarmStoreClient& farm, const FarmUploadOptions& options) {
  FarmUploadReport report;
  // The farm holds a path only with its whole closure: roots it holds need
  // nothing more, and an unchanged closure costs one question, not a read
  // of the closure from Nix.
  if (absl::StatusOr<std::vector<std::string>> missing_roots = farm.Missing(roots);
      missing_roots.ok() && missing_roots->empty()) {
    report.attempts = 1;
    return report;
  } else if (absl::IsUnimplemented(missing_roots.status())) {
    return missing_roots.status();
  }
  ASSIGN_OR_RETURN(std::vector<kiln::v1::PathInfo> closure, local.ClosureInfos(roots), "reading the outputs' closure");
  report.closure_paths = closure.size();
  absl::Duration backoff = options.first_backoff;
  absl::Status last;
  for (report.attempts = 1; report.attempts <= std::max(1, options.attempts); ++report.attempts) {
    last = UploadOnce(closure, local, farm, options.parallel, report);
    if (last.ok()) return report;
    if (!UploadRetryable(last) || report.attempts == options.attempts) break;
    LogWarning("farm-upload", "attempt ", report.attempts, " failed (", last.message(), "); retrying in ",
               absl::FormatDuration(backoff));
    absl::SleepFor(backoff);
    backoff *= 2;
  }
  return WithContext(last, absl::StrCat("after ", report.attempts, " attempt(s)"));
}

void FarmUploadingExecutor::AfterSuccess(const BuildRequest&, kiln::v1::BuildResult& result,
                                         absl::FunctionRef<void(absl::string_view)> say) {
  std::vector<std::string> roots;
  for (const auto& [name, path] : result.outputs()) roots.push_back(path);
  if (roots.empty()) return;
  const absl::Time start = absl::Now();
  absl::StatusOr<FarmUploadReport> sent = UploadClosure(roots, *local_, *farm_, options_);
  if (absl::IsUnimplemented(sent.status())) {
    // A coordinator older than the farm store: nothing to send to.
    say("farm store: the coordinator has none; the outputs stay on this worker");
    return;
  }
  if (!sent.ok()) {
    if (metrics_ != nullptr) metrics_->farm_upload_failures.Increment();
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message(
        absl::StrCat("built, but the outputs could not be added to the farm store: ", sent.status().message()));
    say(result.error_message());
    return;
  }
  if (metrics_ != nullptr) {
    metrics_->farm_uploaded_paths.Increment(static_cast<double>(sent->paths_sent));
    metrics_->farm_uploaded_bytes.Increment(static_cast<double>(sent->nar_bytes_sent));
  }
  if (sent->paths_sent > 0) {
    say(absl::StrFormat("farm store: sent %d of %d path(s) of the outputs' closure (%.1f MiB) in %s", sent->paths_sent,
                        sent->closure_paths, static_cast<double>(sent->nar_bytes_sent) / (1 << 20),
                        absl::FormatDuration(absl::Trunc(absl::Now() - start, absl::Milliseconds(1)))));
  }
}

}  // namespace kiln
