#include "coordinator/rocksdb_state_store.h"
#include "coordinator/job_log.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "coordinator/rocks_status.h"

#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::state::v1::JobRecord;

JobRecord Record(const std::string& id, kiln::v1::JobState state) {
  JobRecord r;
  r.set_job_id(id);
  r.set_buildset_id("b1");
  r.set_state(state);
  r.mutable_spec()->set_attr("default");
  return r;
}

TEST(RocksDbStateStoreTest, CommitSurvivesReopen) {
  testing::TempDir dir;
  {
    auto store = RocksDbStateStore::Open(dir.path(), /*sync=*/false);
    ASSERT_TRUE(store.ok()) << store.status();
    JobRecord a = Record("2", kiln::v1::JOB_STATE_QUEUED);
    JobRecord b = Record("10", kiln::v1::JOB_STATE_SUCCEEDED);
    StateWrite w;
    w.jobs = {&b, &a};
    w.blobs = {{"d1", std::string(100000, 'z')}};
    w.next_job_seq = 11;
    w.next_buildset_seq = 2;
    ASSERT_TRUE((*store)->Commit(w).ok());
    a.set_state(kiln::v1::JOB_STATE_RUNNING);
    StateWrite w2;
    w2.jobs = {&a};
    ASSERT_TRUE((*store)->Commit(w2).ok());
  }
  auto store = RocksDbStateStore::Open(dir.path(), false);
  ASSERT_TRUE(store.ok());
  auto jobs = (*store)->LoadJobs();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 2u);
  // Numeric order, not string order: 2 before 10.
  EXPECT_EQ((*jobs)[0].job_id(), "2");
  EXPECT_EQ((*jobs)[0].state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_EQ((*jobs)[1].job_id(), "10");
  auto counters = (*store)->LoadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_EQ(counters->next_job_seq, 11u);
  EXPECT_EQ(counters->next_buildset_seq, 2u);
  auto blob = (*store)->GetBlob("d1");
  ASSERT_TRUE(blob.ok());
  EXPECT_EQ(blob->size(), 100000u);
  EXPECT_EQ((*store)->GetBlob("missing").status().code(), absl::StatusCode::kNotFound);
}

// A full disk under the store, then space again: a failed write is an
// error, never a crash, and what was committed before it stays. RocksDB's
// own log must not be on that disk: a failed write to it made the next log
// line (DB::Resume writes one first thing) abort the process.
TEST(RocksDbStateStoreTest, AFullDiskFailsWritesWithoutCrashingAndKeepsWhatWasCommitted) {
  testing::TempDir dir;
  const std::string disk = dir.Sub("disk");
  std::filesystem::create_directories(disk);
  testing::ScopedTmpfs small_disk(disk, "8m");
  ASSERT_TRUE(small_disk.status().ok()) << small_disk.status();
  JobRecord job = Record("1", kiln::v1::JOB_STATE_QUEUED);
  {
    auto store = RocksDbStateStore::Open(disk + "/state", /*sync=*/true);
    ASSERT_TRUE(store.ok()) << store.status();
    StateWrite first;
    first.jobs = {&job};
    ASSERT_TRUE((*store)->Commit(first).ok());
    {
      std::ofstream filler(disk + "/filler", std::ios::binary);
      const std::string block(64 << 10, 'x');
      while (filler.write(block.data(), block.size())) {}
    }
    absl::Status failed;
    for (int i = 0; i < 64 && failed.ok(); ++i) {  // Bounded: 8 MiB holds fewer.
      StateWrite w;
      w.blobs = {{absl::StrCat("blob", i), std::string(256 << 10, static_cast<char>('a' + i % 26))}};
      failed = (*store)->Commit(w);
    }
    ASSERT_FALSE(failed.ok()) << "the disk never filled";
    EXPECT_TRUE(IsDiskFull(failed)) << failed;
    std::filesystem::remove(disk + "/filler");
    // RocksDB 7.8 cannot resume after its write-ahead log failed (it says
    // why); the point here is that asking returns instead of aborting.
    absl::Status resumed = (*store)->Resume();
    if (!resumed.ok()) {
      EXPECT_FALSE(resumed.message().empty());
    }
  }
  EXPECT_FALSE(std::filesystem::exists(disk + "/state/LOG"));
  auto reopened = RocksDbStateStore::Open(disk + "/state", /*sync=*/true);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  auto jobs = (*reopened)->LoadJobs();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].job_id(), "1");
}

TEST(RocksDbStateStoreTest, FreshStoreHasDefaultCounters) {
  testing::TempDir dir;
  auto store = RocksDbStateStore::Open(dir.path(), false);
  ASSERT_TRUE(store.ok());
  auto counters = (*store)->LoadCounters();
  ASSERT_TRUE(counters.ok());
  EXPECT_EQ(counters->next_job_seq, 1u);
  EXPECT_TRUE((*store)->LoadJobs()->empty());
}

// The on-disk key and value format, pinned: a change here breaks existing
// coordinators' state and must be deliberate.
TEST(RocksDbStateStoreTest, RecordFormatMatchesGolden) {
  EXPECT_EQ(RocksDbStateStore::JobKey("42"), "00000000000000000042");
  JobRecord r = Record("42", kiln::v1::JOB_STATE_QUEUED);
  r.mutable_spec()->mutable_source()->mutable_tree_root()->set_hash(std::string(64, 'a'));
  r.mutable_spec()->mutable_requirements()->set_system("x86_64-linux");
  r.set_attempt(1);
  std::string text;
  r.SerializeToString(&text);
  std::string hex;
  for (unsigned char c : text) {
    static const char* d = "0123456789abcdef";
    hex += d[c >> 4];
    hex += d[c & 15];
  }
  testing::ExpectMatchesGolden(hex + "\n", "tests/coordinator/testdata/job_record.hex");
}

TEST(RocksDbStateStoreTest, OpenFailsClearlyOnABadDirectory) {
  auto store = RocksDbStateStore::Open("/proc/not-a-place-for-state", false);
  EXPECT_FALSE(store.ok());
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

TEST(StoredLogTest, CompressesAndReadsBackThroughTheStore) {
  kiln::state::v1::StoredLog log;
  for (int i = 0; i < 2000; ++i) {
    kiln::v1::LogLine* line = log.add_lines();
    line->set_derivation("hello");
    line->set_text("compiling file number " + std::to_string(i));
  }
  log.set_dropped_lines(3);
  const std::string bytes = EncodeStoredLog(log);
  EXPECT_LT(bytes.size(), log.ByteSizeLong() / 4) << "build logs compress well";

  testing::TempDir dir;
  auto store = RocksDbStateStore::Open(dir.path(), /*sync=*/false);
  ASSERT_TRUE(store.ok());
  StateWrite write;
  write.logs.emplace_back("42", bytes);
  ASSERT_TRUE((*store)->Commit(write).ok());
  auto read = (*store)->GetLog("42");
  ASSERT_TRUE(read.ok()) << read.status();
  auto decoded = DecodeStoredLog(*read);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->lines_size(), 2000);
  EXPECT_EQ(decoded->lines(1999).text(), "compiling file number 1999");
  EXPECT_EQ(decoded->dropped_lines(), 3u);

  StateWrite removal;
  removal.deleted_logs.push_back("42");
  ASSERT_TRUE((*store)->Commit(removal).ok());
  EXPECT_TRUE(absl::IsNotFound((*store)->GetLog("42").status()));
}

TEST(StoredLogTest, RefusesWhatItDidNotWrite) {
  kiln::state::v1::StoredLog log;
  log.add_lines()->set_text("x");
  std::string bytes = EncodeStoredLog(log);
  EXPECT_FALSE(DecodeStoredLog("").ok());
  EXPECT_FALSE(DecodeStoredLog(std::string(1, '\x02') + bytes.substr(1)).ok());  // Unknown version.
  std::string flipped = bytes;
  flipped.back() ^= 0x55;  // zlib's Adler-32 catches it.
  EXPECT_EQ(DecodeStoredLog(flipped).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(DecodeStoredLog(bytes.substr(0, bytes.size() / 2)).ok());
  EXPECT_FALSE(DecodeStoredLog(bytes, /*max_bytes=*/1).ok());
}

}  // namespace
}  // namespace kiln
