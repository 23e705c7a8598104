#include "coordinator/scheduling_inputs.h"

#include "absl/strings/str_cat.h"

namespace kiln {

JobRequirements RequirementsOf(const kiln::v1::JobSpec& spec) {
  JobRequirements req;
  req.system = spec.requirements().system();
  req.required_features.insert(spec.requirements().required_features().begin(),
                               spec.requirements().required_features().end());
  req.pinned_labels.insert(spec.requirements().pinned_labels().begin(), spec.requirements().pinned_labels().end());
  return req;
}

JobPlacement PlacementOf(const kiln::state::v1::JobRecord& record) {
  JobPlacement placement;
  switch (record.spec().priority()) {
    case kiln::v1::PRIORITY_INTERACTIVE: placement.priority_class = 0; break;
    case kiln::v1::PRIORITY_BATCH: placement.priority_class = 2; break;
    default: placement.priority_class = 1; break;
  }
  placement.buildset = record.buildset_id();
  const auto& spec = record.spec();
  // Rebuilds of the same flake target land where its store is warm.
  placement.locality_key = !spec.locality_key().empty() ? spec.locality_key()
                                                        : absl::StrCat(spec.source().tree_root().hash(), "/",
                                                                       spec.source().flake_subdir(), "#", spec.attr());
  return placement;
}

}  // namespace kiln
