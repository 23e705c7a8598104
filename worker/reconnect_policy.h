// ReconnectPolicy: what the worker does while its coordinator is away.
//
// - When its builds stop being its own: the coordinator holds a departed
//   worker's jobs for one lease, then requeues them elsewhere. A worker away
//   longer than that cancels them rather than finish work another worker is
//   doing again (once per absence).
// - How long to wait before each attempt: exponential back-off from
//   min_backoff to max_backoff, starting over after a stream that had
//   registered, with full jitter (a uniform draw from the upper half) so a
//   fleet does not reconnect in step after a coordinator restart.
//
// Time comes from a Clock and randomness from a seeded source, so both rules
// are tested step by step. Not thread-safe: the connection loop owns it.
#pragma once

#include <cstdint>
#include <random>

#include "absl/time/time.h"
#include "common/clock.h"

namespace kiln {

class ReconnectPolicy {
 public:
  // `seed` 0: a random one.
  ReconnectPolicy(const Clock* clock, absl::Duration min_backoff, absl::Duration max_backoff, uint64_t seed = 0);

  // A stream that had registered ended now: the absence starts.
  void Lost();
  // True once per absence, when it has lasted longer than `lease`.
  bool LeaseLapsed(absl::Duration lease);
  // The wait before the next attempt. `was_registered`: the stream that
  // just ended had registered (the back-off starts over).
  absl::Duration NextWait(bool was_registered);

 private:
  const Clock* const clock_;
  const absl::Duration min_backoff_;
  const absl::Duration max_backoff_;
  absl::Duration backoff_;
  absl::Time away_since_ = absl::InfiniteFuture();
  std::mt19937_64 random_;
};

}  // namespace kiln
