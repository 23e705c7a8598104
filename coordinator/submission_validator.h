// SubmissionValidator: whether a buildset may be accepted, before anything
// is stored — sizes and counts, the token's quota, every blob against its
// digest, each target's source tree (sent inline or uploaded to the CAS
// beforehand), flake directory, attribute, system, priority class, push
// target, and whether any known worker could build it.
//
// Pure apart from reading the blob store; it stores nothing. Every refusal
// names the target and what to change.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "common/source_tree.h"
#include "coordinator/blob_store.h"
#include "coordinator/scheduler.h"
#include "kiln/v1/builds.pb.h"

namespace kiln {

struct SubmissionLimits {
  size_t max_source_bytes = 64 << 20;           // All blobs sent inline with one submission.
  uint64_t max_tree_bytes = uint64_t{4} << 30;  // A tree uploaded beforehand.
  size_t max_targets = 1000;
  uint64_t max_active_jobs_per_token = 0;  // 0: no quota.
  // Priority class names, most urgent first (wire values 1, 2, 3).
  std::vector<std::string> priority_names = {"interactive", "ci", "batch"};
  // Allowed push targets (see BuildCoordinatorOptions::push_allow).
  std::vector<std::string> push_allow = {};
};

// A submission that passed: its inline blobs by hash, and what to store.
struct CheckedSubmission {
  absl::flat_hash_map<std::string, const std::string*> uploads;  // Into the request.
  // Trees sent inline (root, every blob hash), for the CAS.
  std::vector<std::pair<kiln::v1::Digest, std::vector<std::string>>> inline_trees;
  // Without a CAS: the (hash, bytes) of the inline blobs to store with the jobs.
  std::vector<std::pair<std::string, std::string>> blobs;
  // Looks a hash up among the uploads (valid while the request and this live).
  BlobLookup Lookup() const;
};

class SubmissionValidator {
 public:
  // `cas` may be null (no uploaded trees accepted).
  SubmissionValidator(SubmissionLimits limits, const BlobStore* cas);

  // `token_active`: the jobs the submitting token has queued or running.
  // `workers`: when not null, targets no worker it has ever known could
  // build are refused (after the start-up grace window).
  absl::StatusOr<CheckedSubmission> Check(const kiln::v1::SubmitBuildRequest& request, const std::string& token,
                                          uint64_t token_active, const Scheduler* workers) const;

  // The wire priority of a class name; UNSPECIFIED for an unknown one.
  kiln::v1::Priority PriorityOf(const std::string& name) const;

  const SubmissionLimits& limits() const { return limits_; }

 private:
  absl::Status CheckTarget(const kiln::v1::JobSpec& spec, const Scheduler* workers) const;

  const SubmissionLimits limits_;
  const BlobStore* const cas_;
};

// A derivation job's task (JobSpec.derivation): a derivation's store path,
// the derivation it carries decodes whole, is for the job's system, and has
// its output paths (input-addressed or fixed-output).
absl::Status CheckDerivationTask(const kiln::v1::JobSpec& spec);

}  // namespace kiln
