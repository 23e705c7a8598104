#include "cli/serve_build_paths.h"

#include <map>
#include <optional>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "cli/serve_farm_reads.h"
#include "common/derivation.h"
#include "common/nar.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// The closure of .drv files, read from the farm store.
struct Graph {
  std::map<std::string, Derivation> drvs;  // By .drv path.
  OutputPaths outputs;                     // Of every one of them.
};

absl::StatusOr<Graph> ReadClosure(FarmStoreClient& farm, const std::vector<std::string>& tops,
                                  const BuildPathsLimits& limits) {
  Graph graph;
  const auto read = [&](const std::string& path) -> absl::StatusOr<std::string> {
    absl::StatusOr<std::string> nar = SmallFarmNar(farm, path, limits.max_drv_bytes);
    if (absl::IsNotFound(nar.status())) {
      return absl::NotFoundError(absl::StrCat("the farm store lacks ", path, " (copy the derivation there first)"));
    }
    RETURN_IF_ERROR(nar.status());
    return RegularFileOfNar(*nar, limits.max_drv_bytes);
  };
  RETURN_IF_ERROR(WalkDerivations(tops, limits.max_derivations, read, [&](const std::string& path, Derivation& drv) {
    for (const auto& [name, out] : drv.outputs) graph.outputs[path][name] = out.path;
    graph.drvs.emplace(path, std::move(drv));
  }));
  return graph;
}

}  // namespace

absl::StatusOr<ServeBuildResult> BuildPathsOnFarm(FarmStoreClient& farm, DerivationBuilder& builder,
                                                  const std::vector<std::string>& wanted,
                                                  const ServeBuildOptions& options,
                                                  absl::FunctionRef<void(absl::string_view line)> log,
                                                  const BuildPathsLimits& limits) {
  ServeBuildResult result;
  result.start_time = static_cast<uint64_t>(absl::ToUnixSeconds(absl::Now()));
  const auto finish = [&](ServeBuildStatus status, std::string message) {
    result.status = status;
    result.error_msg = std::move(message);
    result.stop_time = static_cast<uint64_t>(absl::ToUnixSeconds(absl::Now()));
    return result;
  };
  // "PATH!OUTPUTS": the outputs are built whole (a derivation is one job);
  // a path that is no derivation must be there already.
  std::vector<std::string> tops, opaque;
  for (const std::string& w : wanted) {
    const std::string path = w.substr(0, w.find('!'));
    RETURN_IF_ERROR(CheckStorePath(path));
    (absl::EndsWith(path, ".drv") ? tops : opaque).push_back(path);
  }
  if (!opaque.empty()) {
    ASSIGN_OR_RETURN(std::vector<std::string> missing, farm.Missing(opaque));
    if (!missing.empty()) {
      return finish(ServeBuildStatus::kMiscFailure,
                    absl::StrCat("path '", missing[0], "' is not valid in the farm store, and is no derivation"));
    }
  }
  if (tops.empty()) return finish(ServeBuildStatus::kAlreadyValid, "");
  ASSIGN_OR_RETURN(Graph graph, ReadClosure(farm, tops, limits));

  // What the farm holds already is done; every other derivation waits for
  // the ones among its inputs that are not.
  std::vector<std::string> all_outputs;
  for (const auto& [drv, outputs] : graph.outputs) {
    for (const auto& [name, path] : outputs) {
      if (!path.empty()) all_outputs.push_back(path);
    }
  }
  ASSIGN_OR_RETURN(std::vector<std::string> missing_list, farm.Missing(all_outputs));
  const absl::flat_hash_set<std::string> missing(missing_list.begin(), missing_list.end());
  absl::flat_hash_map<std::string, size_t> waiting_on;  // Unbuilt inputs per derivation to build.
  absl::flat_hash_map<std::string, std::vector<std::string>> dependents;
  std::vector<std::string> ready;
  for (const auto& [drv, outputs] : graph.outputs) {
    bool built = true;
    for (const auto& [name, path] : outputs) built = built && !path.empty() && !missing.contains(path);
    if (built) continue;
    waiting_on[drv] = 0;
  }
  for (auto& [drv, count] : waiting_on) {
    for (const auto& [input, names] : graph.drvs.at(drv).input_drvs) {
      if (!waiting_on.contains(input)) continue;
      ++count;
      dependents[input].push_back(drv);
    }
    if (count == 0) ready.push_back(drv);
  }
  if (waiting_on.empty()) return finish(ServeBuildStatus::kAlreadyValid, "");
  log(absl::StrCat("kiln: ", waiting_on.size(), " of ", graph.drvs.size(), " derivations to build on the farm"));

  // Builds run on threads of their own, `parallel` at most; this thread
  // starts them as their inputs are built.
  absl::Mutex mu;
  size_t running = 0, done = 0;
  std::optional<std::pair<ServeBuildStatus, std::string>> failure;
  std::vector<std::thread> threads;
  const auto build_one = [&](const std::string& drv_path) {
    std::optional<std::pair<ServeBuildStatus, std::string>> failed;
    absl::StatusOr<Derivation> resolved = ResolveInputs(graph.drvs.at(drv_path), graph.outputs);
    if (!resolved.ok()) {
      failed.emplace(ServeBuildStatus::kMiscFailure, std::string(resolved.status().message()));
    } else {
      absl::StatusOr<ServeBuildResult> r =
          builder.Build(drv_path, ToServeDerivation(*resolved), options, [&](absl::string_view line) {
            absl::MutexLock lock(&mu);
            log(line);
          });
      if (!r.ok()) {
        failed.emplace(ServeBuildStatus::kMiscFailure, absl::StrCat("kiln: ", r.status().message()));
      } else if (!ServeBuildSucceeded(r->status)) {
        failed.emplace(r->status, absl::StrCat("build of '", drv_path, "' failed: ", r->error_msg));
      }
    }
    absl::MutexLock lock(&mu);
    --running;
    ++done;
    if (failed.has_value()) {
      if (!failure.has_value()) failure = std::move(failed);
      return;
    }
    for (const std::string& d : dependents[drv_path]) {
      if (--waiting_on[d] == 0) ready.push_back(d);
    }
  };
  {
    struct Progress {
      const size_t* done;
      size_t seen;
      bool Changed() const { return *done != seen; }
    };
    absl::MutexLock lock(&mu);
    for (;;) {
      while (!failure.has_value() && !ready.empty() && running < limits.parallel) {
        const std::string next = std::move(ready.back());
        ready.pop_back();
        ++running;
        threads.emplace_back(build_one, next);
      }
      if (running == 0 && (failure.has_value() || ready.empty())) break;
      const Progress progress{&done, done};
      mu.Await(absl::Condition(&progress, &Progress::Changed));
    }
  }
  for (std::thread& t : threads) t.join();
  if (failure.has_value()) return finish(failure->first, failure->second);
  if (done != waiting_on.size()) {
    return finish(ServeBuildStatus::kMiscFailure, "the derivation graph has a cycle");
  }
  result.times_built = done;
  return finish(ServeBuildStatus::kBuilt, "");
}

}  // namespace kiln
