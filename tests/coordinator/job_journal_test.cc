// JobJournal on its own: events, watchers, in-memory logs and the retention
// of stored logs, on a FakeClock.
#include "coordinator/job_journal.h"

#include <gtest/gtest.h>

#include "coordinator/job_log.h"
#include "tests/support/coordinator_fakes.h"
#include "tests/support/fake_clock.h"

namespace kiln {
namespace {

using kiln::v1::JobEvent;

JobEvent LogEvent(const std::string& text) {
  JobEvent e;
  e.mutable_log()->add_lines()->set_text(text);
  return e;
}

JobEvent Queued() {
  JobEvent e;
  e.mutable_queued()->set_attempt(0);
  return e;
}

constexpr uint64_t kIncarnation = 77;

TEST(JobJournal, LiveEventsWaitForReleaseAndCarryIdTimeAndSequence) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {});
  JobJournal::Entry entry;
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  journal.Watch("1", entry, 0, 0, watcher, /*finished=*/false);
  journal.Append("1", entry, Queued());
  clock.Advance(absl::Seconds(3));
  journal.Append("1", entry, LogEvent("hello"));
  EXPECT_TRUE(watcher->events.empty()) << "events go out only after the write that stores them";
  journal.Release();
  ASSERT_EQ(watcher->events.size(), 2u);
  EXPECT_EQ(watcher->events[0].sequence(), 1u);
  EXPECT_EQ(watcher->events[1].sequence(), 2u);
  EXPECT_EQ(watcher->events[1].job_id(), "1");
  EXPECT_EQ(watcher->events[1].incarnation(), kIncarnation);
  EXPECT_EQ(watcher->events[1].time().seconds() - watcher->events[0].time().seconds(), 3);
  EXPECT_FALSE(watcher->closed);
  journal.Finished(entry);
  EXPECT_FALSE(watcher->closed);
  journal.Release();
  EXPECT_TRUE(watcher->closed);
}

TEST(JobJournal, ReplayResumesFromASequenceOnlyInTheSameIncarnation) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {});
  JobJournal::Entry entry;
  for (int i = 0; i < 4; ++i) journal.Append("9", entry, LogEvent(absl::StrCat("line ", i)));
  auto same = std::make_shared<testing::FakeJobWatcher>();
  journal.Watch("9", entry, 3, kIncarnation, same, false);
  ASSERT_EQ(same->events.size(), 2u);
  EXPECT_EQ(same->events[0].sequence(), 3u);
  auto earlier = std::make_shared<testing::FakeJobWatcher>();
  journal.Watch("9", entry, 3, kIncarnation - 1, earlier, /*finished=*/true);
  EXPECT_EQ(earlier->events.size(), 4u) << "another process's sequence means nothing here";
  EXPECT_TRUE(earlier->closed);
  journal.Unwatch(entry, same.get());
  journal.Append("9", entry, LogEvent("after"));
  journal.Release();
  EXPECT_EQ(same->events.size(), 2u);
}

TEST(JobJournal, LogPastTheBudgetReachesLiveWatchersOnlyAndIsCounted) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {.log_bytes_per_job = 64});
  JobJournal::Entry entry;
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  journal.Watch("1", entry, 0, kIncarnation, watcher, false);
  for (int i = 0; i < 10; ++i) journal.Append("1", entry, LogEvent(std::string(20, 'a' + i)));
  journal.Release();
  EXPECT_EQ(watcher->events.size(), 10u);
  google::protobuf::RepeatedPtrField<kiln::v1::LogLine> kept;
  journal.AppendLogLines(entry, kept);
  EXPECT_GT(kept.size(), 0);
  EXPECT_LT(kept.size(), 10);
  EXPECT_EQ(kept.size() + static_cast<int>(journal.dropped_log_lines(entry)), 10);
}

TEST(JobJournal, RetentionRemovesTheOldestStoredLogsButKeepsTheNewest) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {.log_retention_bytes = 1});
  JobJournal::Entry a, b, empty;
  journal.Append("1", a, LogEvent("first job's line"));
  journal.Append("2", b, LogEvent("second job's line"));
  JobJournal::StoredLog first = journal.StoreLog("1", a);
  EXPECT_GT(first.bytes, 0);
  EXPECT_TRUE(first.expired.empty()) << "the newest log stays, even alone over the limit";
  EXPECT_EQ(journal.stored_log_bytes(), static_cast<uint64_t>(first.bytes));
  JobJournal::StoredLog second = journal.StoreLog("2", b);
  EXPECT_EQ(second.expired, std::vector<std::string>{"1"});
  EXPECT_EQ(journal.stored_log_bytes(), static_cast<uint64_t>(second.bytes));
  EXPECT_EQ(journal.StoreLog("3", empty).bytes, 0) << "a job that logged nothing stores nothing";

  std::vector<std::pair<std::string, std::string>> logs;
  std::vector<std::string> deletes;
  journal.TakeLogWrites(logs, deletes);
  ASSERT_EQ(logs.size(), 2u);
  EXPECT_EQ(deletes, std::vector<std::string>{"1"});
  absl::StatusOr<kiln::state::v1::StoredLog> decoded = DecodeStoredLog(logs[1].second);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->lines(0).text(), "second job's line");

  // A failed write gives them back, ahead of anything newer.
  JobJournal::Entry c;
  journal.Append("4", c, LogEvent("fourth"));
  journal.StoreLog("4", c);
  journal.ReturnLogWrites(logs, deletes);
  std::vector<std::pair<std::string, std::string>> again;
  std::vector<std::string> deletes_again;
  journal.TakeLogWrites(again, deletes_again);
  ASSERT_EQ(again.size(), 3u);
  EXPECT_EQ(again[0].first, "1");
  EXPECT_EQ(again[1].first, "2");
  EXPECT_EQ(again[2].first, "4");
  EXPECT_EQ(deletes_again, (std::vector<std::string>{"1", "2"}));
}

TEST(JobJournal, RecoveredLogsExpireOldestFinishedFirst) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {.log_retention_bytes = 205});
  journal.RecoverStoredLog("late", 300, 100);
  journal.RecoverStoredLog("early", 100, 100);
  journal.SortRecovered();
  EXPECT_EQ(journal.stored_log_bytes(), 200u);
  JobJournal::Entry e;
  journal.Append("new", e, LogEvent(std::string(200, 'x')));
  JobJournal::StoredLog stored = journal.StoreLog("new", e);
  ASSERT_FALSE(stored.expired.empty());
  EXPECT_EQ(stored.expired.front(), "early");
}

TEST(JobJournal, OnlyTheMostRecentlyFinishedJobsKeepTheirLogInMemory) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {.finished_jobs_with_logs = 2});
  std::vector<JobJournal::Entry> entries(3);
  for (int i = 0; i < 3; ++i) {
    journal.Append(absl::StrCat(i), entries[i], Queued());
    journal.Append(absl::StrCat(i), entries[i], LogEvent("built"));
    journal.Finished(entries[i]);
  }
  google::protobuf::RepeatedPtrField<kiln::v1::LogLine> oldest, newest;
  journal.AppendLogLines(entries[0], oldest);
  journal.AppendLogLines(entries[2], newest);
  EXPECT_EQ(oldest.size(), 0);
  EXPECT_EQ(newest.size(), 1);
  auto late = std::make_shared<testing::FakeJobWatcher>();
  journal.Watch("0", entries[0], 0, kIncarnation, late, true);
  ASSERT_EQ(late->events.size(), 1u) << "its other events stay";
  EXPECT_TRUE(late->events[0].has_queued());
}

TEST(JobJournal, CloseWatchersClosesNowWithTheStatus) {
  testing::FakeClock clock;
  JobJournal journal(&clock, kIncarnation, {});
  JobJournal::Entry entry;
  auto watcher = std::make_shared<testing::FakeJobWatcher>();
  journal.Watch("1", entry, 0, kIncarnation, watcher, false);
  journal.CloseWatchers(entry, absl::UnavailableError("shutting down"));
  EXPECT_TRUE(watcher->closed);
  EXPECT_EQ(watcher->close_status.code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace kiln
