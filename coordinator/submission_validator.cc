#include "coordinator/submission_validator.h"

#include "common/narinfo.h"
#include "common/serve_protocol.h"
#include "common/status_macros.h"

#include "absl/algorithm/container.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/digest.h"
#include "common/image_ref.h"
#include "common/installable.h"
#include "coordinator/scheduling_inputs.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// A push target is well formed and allowed by the coordinator's patterns.
absl::Status CheckPushTarget(const kiln::v1::PushTarget& push, const std::vector<std::string>& allow) {
  if (absl::Status s = ParsePushRepository(push.repository()).status(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("push target ", s.message()));
  }
  if (push.tags().empty())
    return absl::InvalidArgumentError(absl::StrCat("push target ", push.repository(), " has no tag"));
  if (push.tags_size() > 16) return absl::InvalidArgumentError("more than 16 tags in one push");
  for (const std::string& tag : push.tags()) {
    if (absl::Status s = ValidateImageTag(tag); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("push target ", push.repository(), ": tag ", s.message()));
    }
    const bool allowed = absl::c_any_of(
        allow, [&](const std::string& pattern) { return PushPatternMatches(pattern, push.repository(), tag); });
    if (!allowed) {
      return absl::PermissionDeniedError(
          absl::StrCat("push target ", push.repository(), ":", tag, " is not allowed by this coordinator",
                       allow.empty() ? " (it allows no pushes: see kiln-coordinator --push-allow)"
                                     : absl::StrCat(" (allowed: ", absl::StrJoin(allow, ", "), ")")));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSubdir(absl::string_view subdir) {
  if (absl::StartsWith(subdir, "/")) {
    return absl::InvalidArgumentError(absl::StrCat("flake_subdir '", subdir, "' must be relative"));
  }
  for (absl::string_view part : absl::StrSplit(subdir, '/')) {
    if (part == "..")
      return absl::InvalidArgumentError(absl::StrCat("flake_subdir '", subdir, "' leaves the source tree"));
  }
  return absl::OkStatus();
}

absl::Status NoArchives() {
  return absl::InvalidArgumentError(
      "source archives are no longer accepted; upgrade the kiln CLI (it sends source trees)");
}

}  // namespace

BlobLookup CheckedSubmission::Lookup() const {
  return [this](const std::string& hash) -> const std::string* {
    auto it = uploads.find(hash);
    return it == uploads.end() ? nullptr : it->second;
  };
}

SubmissionValidator::SubmissionValidator(SubmissionLimits limits, const BlobStore* cas)
    : limits_(std::move(limits)), cas_(cas) {}

kiln::v1::Priority SubmissionValidator::PriorityOf(const std::string& name) const {
  for (size_t i = 0; i < limits_.priority_names.size() && i < kPriorityClasses; ++i) {
    if (limits_.priority_names[i] == name) return static_cast<kiln::v1::Priority>(i + 1);
  }
  return kiln::v1::PRIORITY_UNSPECIFIED;
}

absl::StatusOr<CheckedSubmission> SubmissionValidator::Check(const kiln::v1::SubmitBuildRequest& request,
                                                             const std::string& token, uint64_t token_active,
                                                             const Scheduler* workers) const {
  if (request.targets().empty()) return absl::InvalidArgumentError("no build targets");
  if (static_cast<size_t>(request.targets_size()) > limits_.max_targets) {
    return absl::InvalidArgumentError(
        absl::StrCat(request.targets_size(), " targets in one submission; the limit is ", limits_.max_targets));
  }
  if (!token.empty() && limits_.max_active_jobs_per_token > 0 &&
      token_active + static_cast<uint64_t>(request.targets_size()) > limits_.max_active_jobs_per_token) {
    return absl::ResourceExhaustedError(
        absl::StrCat("token '", token, "' has ", token_active, " job(s) queued or running; ", request.targets_size(),
                     " more would pass its quota of ", limits_.max_active_jobs_per_token,
                     " (kiln-coordinator --token-max-active-jobs)"));
  }
  if (!request.source_archive().empty()) return NoArchives();
  CheckedSubmission out;
  // Index the uploaded blobs, each checked against its digest.
  uint64_t uploaded = 0;
  for (const auto& blob : request.blobs()) {
    uploaded += blob.data().size();
    if (uploaded > limits_.max_source_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the submission's source is larger than ", limits_.max_source_bytes >> 20, " MiB"));
    }
    if (absl::Status s = VerifyBlob(blob.digest(), blob.data()); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("uploaded source blob: ", s.message()));
    }
    out.uploads.try_emplace(blob.digest().hash(), &blob.data());
  }
  const BlobLookup lookup = out.Lookup();
  const SourceTreeLimits limits{.max_total_bytes = limits_.max_source_bytes};
  absl::flat_hash_set<std::string> stored, checked_roots;
  for (const auto& target : request.targets()) {
    const auto& spec = target.spec();
    if (spec.source().has_archive()) return NoArchives();
    if (!spec.source().has_tree_root()) return absl::InvalidArgumentError("target has no source tree");
    // Every blob the tree needs must be here; the tree itself must be sound.
    // Targets of one buildset usually share a tree: check each tree once.
    const kiln::v1::Digest& root = spec.source().tree_root();
    if (!out.uploads.contains(root.hash()) && checked_roots.insert(root.hash()).second) {
      // Uploaded to the CAS beforehand: a stored directory stands for its
      // whole tree, and its summary says whether the tree is acceptable.
      absl::StatusOr<kiln::state::v1::BlobMeta> meta =
          cas_ != nullptr ? cas_->Meta(root.hash()) : absl::NotFoundError("no CAS");
      if (!meta.ok() || !meta->is_directory() || meta->size_bytes() != root.size_bytes()) {
        return absl::NotFoundError(absl::StrCat(spec.display_name(), ": source tree ", root.hash(),
                                                " is neither uploaded nor sent with the submission"));
      }
      TreeSummary summary{.bytes = static_cast<uint64_t>(meta->tree_bytes()),
                          .entries = static_cast<uint64_t>(meta->tree_entries()),
                          .depth = meta->tree_depth(),
                          .link_escape = meta->link_escape()};
      SourceTreeLimits tree_limits;
      tree_limits.max_total_bytes = limits_.max_tree_bytes;
      if (absl::Status s = CheckTreeSummary(summary, tree_limits); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat(spec.display_name(), ": ", s.message()));
      }
    } else if (checked_roots.insert(root.hash()).second) {
      absl::StatusOr<std::vector<std::string>> needed = ListTreeBlobs(root, lookup, limits);
      if (!needed.ok()) {
        return absl::Status(needed.status().code(), absl::StrCat(spec.display_name(), ": ", needed.status().message()));
      }
      if (cas_ != nullptr) {
        out.inline_trees.push_back({root, *std::move(needed)});
      } else {
        for (const std::string& hash : *needed) {
          if (stored.insert(hash).second) out.blobs.emplace_back(hash, *out.uploads.at(hash));
        }
      }
    }
    RETURN_IF_ERROR(CheckTarget(spec, workers));
  }
  return out;
}

absl::Status SubmissionValidator::CheckTarget(const kiln::v1::JobSpec& spec, const Scheduler* workers) const {
  RETURN_IF_ERROR(ValidateSubdir(spec.source().flake_subdir()));
  RETURN_IF_ERROR(ValidateAttrPath(spec.attr()));
  if (spec.requirements().system().empty()) {
    return absl::InvalidArgumentError("target has no system (e.g. x86_64-linux)");
  }
  if (!spec.priority_class().empty() && PriorityOf(spec.priority_class()) == kiln::v1::PRIORITY_UNSPECIFIED) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown priority class '", spec.priority_class(),
                     "'; this coordinator has: ", absl::StrJoin(limits_.priority_names, ", ")));
  }
  // Refuse what no worker could ever build rather than queue it forever.
  if (workers != nullptr && workers->has_known_workers()) {
    if (std::string unmet = workers->UnmetByKnownWorkers(RequirementsOf(spec)); !unmet.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(spec.display_name(), ": ", unmet));
    }
  }
  if (spec.has_derivation()) RETURN_IF_ERROR(CheckDerivationTask(spec));
  if (spec.has_push()) return CheckPushTarget(spec.push(), limits_.push_allow);
  return absl::OkStatus();
}

absl::Status CheckDerivationTask(const kiln::v1::JobSpec& spec) {
  const kiln::v1::DerivationTask& task = spec.derivation();
  if (!absl::StartsWith(task.drv_path(), "/nix/store/") || !absl::EndsWith(task.drv_path(), ".drv") ||
      !StorePathHashPart(task.drv_path()).ok()) {
    return absl::InvalidArgumentError(absl::StrCat("not a derivation's store path: ", task.drv_path()));
  }
  if (spec.has_push() || spec.has_fod_task() || spec.fetch_outputs()) {
    return absl::InvalidArgumentError("a derivation job pushes nothing and has no FOD task or output download");
  }
  absl::StatusOr<ServeDerivation> drv = DecodeServeDerivation(task.basic_derivation());
  if (!drv.ok()) return WithContext(drv.status(), absl::StrCat("the derivation ", task.drv_path()));
  if (drv->platform != spec.requirements().system()) {
    return absl::InvalidArgumentError(absl::StrCat("the derivation ", task.drv_path(), " is for ", drv->platform,
                                                   ", the job for ", spec.requirements().system()));
  }
  for (const ServeDerivationOutput& o : drv->outputs) {
    if (o.path.empty() || !absl::StartsWith(o.path, "/nix/store/")) {
      return absl::InvalidArgumentError(absl::StrCat("the derivation ", task.drv_path(), "'s output ", o.name,
                                                     " has no store path (content-addressed derivations are not "
                                                     "built through the gateway)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kiln
