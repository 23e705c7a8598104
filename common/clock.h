// Time as a seam: logic asks a Clock, never the wall clock directly, so tests
// can drive time step by step (see tests/support/fake_clock.h).
#pragma once

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kiln {

class Clock {
 public:
  virtual ~Clock() = default;
  // Thread-safe.
  virtual absl::Time Now() const = 0;
};

class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  // A process-wide instance; never destroyed.
  static Clock* Get();
};

}  // namespace kiln
