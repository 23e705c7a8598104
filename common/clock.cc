#include "common/clock.h"

namespace kiln {

Clock* RealClock::Get() {
  static Clock* clock = new RealClock();
  return clock;
}

std::string FormatTimestamp(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", t, absl::UTCTimeZone()); }

}  // namespace kiln
