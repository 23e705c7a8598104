// The StateStore contract, run on the real store (RocksDB in a temporary
// directory) and on the in-memory fake: what one does, the other must.
#include <gtest/gtest.h>

#include <memory>

#include "coordinator/rocksdb_state_store.h"
#include "tests/support/in_memory_state_store.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::state::v1::JobRecord;

class StoreFactory {
 public:
  virtual ~StoreFactory() = default;
  virtual StateStore* store() = 0;
};

class RocksDbFactory final : public StoreFactory {
 public:
  RocksDbFactory() {
    auto opened = RocksDbStateStore::Open(dir_.path(), /*sync=*/false);
    EXPECT_TRUE(opened.ok()) << opened.status();
    if (opened.ok()) store_ = *std::move(opened);
  }
  StateStore* store() override { return store_.get(); }

 private:
  testing::TempDir dir_;
  std::unique_ptr<RocksDbStateStore> store_;
};

class InMemoryFactory final : public StoreFactory {
 public:
  StateStore* store() override { return &store_; }

 private:
  testing::InMemoryStateStore store_;
};

class StateStoreContract : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (GetParam() == "rocksdb") {
      factory_ = std::make_unique<RocksDbFactory>();
    } else {
      factory_ = std::make_unique<InMemoryFactory>();
    }
    store_ = factory_->store();
    ASSERT_NE(store_, nullptr);
  }
  std::unique_ptr<StoreFactory> factory_;
  StateStore* store_ = nullptr;
};

JobRecord Record(const std::string& id, kiln::v1::JobState state) {
  JobRecord r;
  r.set_job_id(id);
  r.set_buildset_id("b1");
  r.set_state(state);
  return r;
}

TEST_P(StateStoreContract, RecordsComeBackInNumericOrderWithTheirLastState) {
  JobRecord a = Record("2", kiln::v1::JOB_STATE_QUEUED), b = Record("10", kiln::v1::JOB_STATE_SUCCEEDED);
  StateWrite w;
  w.jobs = {&b, &a};
  ASSERT_TRUE(store_->Commit(w).ok());
  a.set_state(kiln::v1::JOB_STATE_RUNNING);
  const std::string packed = a.SerializeAsString(), id = a.job_id();
  StateWrite w2;
  w2.packed_jobs = {{&id, &packed}};
  ASSERT_TRUE(store_->Commit(w2).ok());
  absl::StatusOr<std::vector<JobRecord>> jobs = store_->LoadJobs();
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].job_id(), "2");
  EXPECT_EQ((*jobs)[0].state(), kiln::v1::JOB_STATE_RUNNING);
  EXPECT_EQ((*jobs)[1].job_id(), "10");
}

TEST_P(StateStoreContract, CountersStartAtOneAndMoveOnlyWhenWritten) {
  absl::StatusOr<StoredCounters> fresh = store_->LoadCounters();
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(fresh->next_job_seq, 1u);
  EXPECT_EQ(fresh->next_buildset_seq, 1u);
  StateWrite w;
  w.next_job_seq = 7;
  ASSERT_TRUE(store_->Commit(w).ok());
  absl::StatusOr<StoredCounters> after = store_->LoadCounters();
  EXPECT_EQ(after->next_job_seq, 7u);
  EXPECT_EQ(after->next_buildset_seq, 1u);
}

TEST_P(StateStoreContract, BlobsLogsAndCachedResultsAreFoundOrNotFound) {
  EXPECT_TRUE(absl::IsNotFound(store_->GetBlob("ab").status()));
  EXPECT_TRUE(absl::IsNotFound(store_->GetLog("1").status()));
  EXPECT_TRUE(absl::IsNotFound(store_->GetCachedResult("k").status()));
  kiln::state::v1::CachedResult cached;
  cached.set_job_id("1");
  StateWrite w;
  w.blobs = {{"ab", "bytes"}};
  w.logs = {{"1", "log one"}, {"2", "log two"}};
  w.cached_results = {{"k", &cached}};
  ASSERT_TRUE(store_->Commit(w).ok());
  EXPECT_EQ(*store_->GetBlob("ab"), "bytes");
  EXPECT_EQ(*store_->GetLog("2"), "log two");
  EXPECT_EQ(store_->GetCachedResult("k")->job_id(), "1");
  StateWrite remove;
  remove.deleted_logs = {"1"};
  ASSERT_TRUE(store_->Commit(remove).ok());
  EXPECT_TRUE(absl::IsNotFound(store_->GetLog("1").status()));
  EXPECT_TRUE(store_->GetLog("2").ok());
}

TEST_P(StateStoreContract, AFunctionsErrorStopsTheWalk) {
  JobRecord a = Record("1", kiln::v1::JOB_STATE_QUEUED), b = Record("2", kiln::v1::JOB_STATE_QUEUED);
  StateWrite w;
  w.jobs = {&a, &b};
  ASSERT_TRUE(store_->Commit(w).ok());
  int seen = 0;
  absl::Status s = store_->ForEachPackedJob([&](absl::string_view) {
    ++seen;
    return absl::CancelledError("enough");
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(seen, 1);
}

INSTANTIATE_TEST_SUITE_P(Stores, StateStoreContract, ::testing::Values("rocksdb", "in_memory"));

}  // namespace
}  // namespace kiln
