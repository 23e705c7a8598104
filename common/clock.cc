#include "common/clock.h"

namespace kiln {

Clock* RealClock::Get() {
  static Clock* clock = new RealClock();
  return clock;
}

}  // namespace kiln
