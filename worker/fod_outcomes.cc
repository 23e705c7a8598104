#include "worker/fod_outcomes.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/hash_mismatch.h"

namespace kiln {

using kiln::v1::FodVerdict;

ClosureIndex::ClosureIndex(const std::vector<ClosureFod>& fods) : fods_(fods) {
  for (size_t i = 0; i < fods.size(); ++i) {
    by_path_[fods[i].drv_path] = i;
    by_path_[fods[i].fod.output_path] = i;
  }
}

const ClosureFod* ClosureIndex::Find(const std::string& path) const {
  auto it = by_path_.find(path);
  return it == by_path_.end() ? nullptr : &fods_[it->second];
}

std::vector<kiln::v1::FodOutcome> HarvestFods(const ClosureIndex& index, const NixRunReport& nix,
                                              absl::string_view source, const ValidPathsQuery& valid,
                                              kiln::v1::BuildResult& result, std::string* note) {
  std::vector<kiln::v1::FodOutcome> outcomes;
  absl::flat_hash_set<std::string> mismatched;
  for (const HashMismatch& m : ParseHashMismatches(absl::StrJoin(nix.errors, "\n"))) {
    const ClosureFod* fod = index.Find(m.path);
    if (fod == nullptr) continue;
    mismatched.insert(fod->drv_path);
    kiln::v1::HashMismatch* out = result.add_hash_mismatches();
    out->set_drv_path(fod->drv_path);
    out->set_name(fod->fod.name);
    out->set_specified(m.specified);
    out->set_got(m.got);
    out->set_source(std::string(source));
    kiln::v1::FodOutcome& o = outcomes.emplace_back();
    *o.mutable_fod() = RefOf(*fod);
    o.set_got(m.got);
  }
  // The FODs whose build ended without a mismatch: verified if Nix now holds
  // their output (one that failed otherwise may have left a directory there).
  std::vector<std::pair<const ClosureFod*, double>> ended;
  std::vector<std::string> outputs;
  for (const NixRunReport::Built& b : nix.built) {
    const ClosureFod* fod = index.Find(b.drv_path);
    if (fod == nullptr) continue;
    if (mismatched.contains(fod->drv_path)) {
      for (auto& o : outcomes) {
        if (o.fod().drv_path() == fod->drv_path) o.set_build_seconds(b.seconds);
      }
      continue;
    }
    ended.emplace_back(fod, b.seconds);
    outputs.push_back(fod->fod.output_path);
  }
  if (ended.empty()) return outcomes;
  absl::StatusOr<absl::flat_hash_set<std::string>> held = valid(outputs);
  if (!held.ok()) {
    if (note != nullptr) *note = absl::StrCat("FOD hashes not recorded: ", held.status().message());
    return outcomes;
  }
  for (const auto& [fod, seconds] : ended) {
    if (!held->contains(fod->fod.output_path)) continue;  // Failed for another reason.
    kiln::v1::FodOutcome& o = outcomes.emplace_back();
    *o.mutable_fod() = RefOf(*fod);
    o.set_got(fod->fod.declared.Sri());
    o.set_build_seconds(seconds);
  }
  return outcomes;
}

namespace {

const char* VerdictName(FodVerdict::Kind kind) {
  switch (kind) {
    case FodVerdict::KIND_RIGHT: return "right";
    case FodVerdict::KIND_WRONG: return "wrong";
    case FodVerdict::KIND_SUSPECT_STALE: return "suspect";
    case FodVerdict::KIND_NONDETERMINISTIC: return "nondeterministic";
    default: return "unknown";
  }
}

}  // namespace

// A FOD fed a whole flake source tree (`src = ./.`) gets a new key with
// every edit of the flake: worth telling its author.
bool TakesWholeFlakeSource(const ClosureFod& fod) {
  for (const std::string& src : fod.input_srcs) {
    std::error_code ec;
    if (absl::EndsWith(src, "-source") && std::filesystem::exists(src + "/flake.nix", ec)) return true;
  }
  return false;
}

kiln::v1::FodReport ReportOf(const ClosureFod& fod) {
  kiln::v1::FodReport r;
  r.set_name(fod.fod.name);
  r.set_drv_path(fod.drv_path);
  r.set_declared(fod.fod.declared.Sri());
  r.set_key(fod.fod.key);
  r.set_whole_source(TakesWholeFlakeSource(fod));
  return r;
}

// MODE_SCAN: every FOD of the closure with the cache's verdict.
void ReportFods(const std::vector<ClosureFod>& fods, const std::vector<FodVerdict>& verdicts,
                kiln::v1::BuildResult& result) {
  if (!fods.empty() && verdicts.size() != fods.size()) {
    result.set_code(kiln::v1::RESULT_CODE_INFRA_ERROR);
    result.set_error_message("the FOD cache could not be asked");
    return;
  }
  for (size_t i = 0; i < fods.size(); ++i) {
    kiln::v1::FodReport* r = result.add_fod_reports();
    *r = ReportOf(fods[i]);
    const FodVerdict& v = verdicts[i];
    r->set_verdict(VerdictName(v.kind()));
    if (v.has_entry()) {
      r->set_correct(v.entry().hash());
      r->set_source("cache");
      r->set_computed_by_job(v.entry().computed_by_job());
      r->set_computed_by_worker(v.entry().computed_by_worker());
    }
  }
  result.set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
}

}  // namespace kiln
