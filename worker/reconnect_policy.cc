#include "worker/reconnect_policy.h"

#include <algorithm>

namespace kiln {

ReconnectPolicy::ReconnectPolicy(const Clock* clock, absl::Duration min_backoff, absl::Duration max_backoff,
                                 uint64_t seed)
    : clock_(clock),
      min_backoff_(min_backoff),
      max_backoff_(std::max(min_backoff, max_backoff)),
      backoff_(min_backoff),
      random_(seed != 0 ? seed : std::random_device{}()) {}

void ReconnectPolicy::Lost() { away_since_ = clock_->Now(); }

bool ReconnectPolicy::LeaseLapsed(absl::Duration lease) {
  if (clock_->Now() - away_since_ <= lease) return false;
  away_since_ = absl::InfiniteFuture();
  return true;
}

absl::Duration ReconnectPolicy::NextWait(bool was_registered) {
  if (was_registered) backoff_ = min_backoff_;
  const double ms = absl::ToDoubleMilliseconds(backoff_);
  std::uniform_real_distribution<double> jitter(ms / 2, ms);
  const absl::Duration wait = absl::Milliseconds(jitter(random_));
  backoff_ = std::min(max_backoff_, backoff_ * 2);
  return wait;
}

}  // namespace kiln
