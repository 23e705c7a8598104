// What the Scheduler needs to know of a job, read from its spec and record:
// which workers may build it, and where it sits in the queue.
#pragma once

#include "coordinator/scheduler.h"
#include "kiln/state/v1/records.pb.h"
#include "kiln/v1/builds.pb.h"

namespace kiln {

// Its system, required features and pinned labels.
JobRequirements RequirementsOf(const kiln::v1::JobSpec& spec);
// Its priority class, buildset and locality key (no back-off).
JobPlacement PlacementOf(const kiln::state::v1::JobRecord& record);

}  // namespace kiln
