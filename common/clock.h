// Time as a seam: logic asks a Clock, never the wall clock directly, so tests
// can drive time step by step (see tests/support/fake_clock.h).
#pragma once

#include <string>

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

// UTC, RFC 3339 with milliseconds ("2026-11-25T22:14:26.123Z"): how logs and
// JSON events stamp their lines.
std::string FormatTimestamp(absl::Time t);

}  // namespace kiln
