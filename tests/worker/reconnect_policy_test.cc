// The worker's rules while its coordinator is away, on a FakeClock and a
// seeded jitter source.
#include "worker/reconnect_policy.h"

#include <gtest/gtest.h>

#include "tests/support/fake_clock.h"

namespace kiln {
namespace {

TEST(ReconnectPolicy, BuildsAreCancelledOnceWhenTheAbsenceOutlastsTheLease) {
  testing::FakeClock clock;
  ReconnectPolicy policy(&clock, absl::Milliseconds(200), absl::Seconds(10), 1);
  const absl::Duration lease = absl::Seconds(60);
  EXPECT_FALSE(policy.LeaseLapsed(lease)) << "never connected: nothing of ours is held";
  policy.Lost();
  clock.Advance(absl::Seconds(60));
  EXPECT_FALSE(policy.LeaseLapsed(lease)) << "exactly the lease: the coordinator still holds them";
  clock.Advance(absl::Milliseconds(1));
  EXPECT_TRUE(policy.LeaseLapsed(lease));
  EXPECT_FALSE(policy.LeaseLapsed(lease)) << "once per absence";
  clock.Advance(absl::Hours(1));
  EXPECT_FALSE(policy.LeaseLapsed(lease));
  // Back, then away again: a new absence, measured from its own start.
  policy.Lost();
  clock.Advance(absl::Seconds(30));
  EXPECT_FALSE(policy.LeaseLapsed(lease));
  EXPECT_TRUE(policy.LeaseLapsed(absl::Seconds(10))) << "the lease the coordinator gave last";
}

TEST(ReconnectPolicy, WaitsDoubleWithJitterUpToTheCapAndStartOverAfterARegisteredStream) {
  testing::FakeClock clock;
  ReconnectPolicy policy(&clock, absl::Milliseconds(200), absl::Seconds(1), 42);
  absl::Duration bound = absl::Milliseconds(200);
  for (int i = 0; i < 6; ++i) {
    const absl::Duration wait = policy.NextWait(false);
    EXPECT_GE(wait, bound / 2) << "attempt " << i;
    EXPECT_LE(wait, bound) << "attempt " << i;
    bound = std::min(absl::Seconds(1), bound * 2);
  }
  const absl::Duration after_registered = policy.NextWait(true);
  EXPECT_LE(after_registered, absl::Milliseconds(200));
}

TEST(ReconnectPolicy, TheSameSeedDrawsTheSameWaitsAndAnotherSpreadsThem) {
  testing::FakeClock clock;
  ReconnectPolicy a(&clock, absl::Seconds(1), absl::Seconds(8), 7), b(&clock, absl::Seconds(1), absl::Seconds(8), 7),
      c(&clock, absl::Seconds(1), absl::Seconds(8), 8);
  bool all_same_as_c = true;
  for (int i = 0; i < 5; ++i) {
    const absl::Duration wa = a.NextWait(false);
    EXPECT_EQ(wa, b.NextWait(false));
    all_same_as_c &= wa == c.NextWait(false);
  }
  EXPECT_FALSE(all_same_as_c) << "a fleet's workers must not reconnect in step";
}

}  // namespace
}  // namespace kiln
