// FodCache on a real RocksDB: verdicts, the silent-stale index,
// nondeterminism, administration, and survival across a reopen.
#include "coordinator/fod_cache.h"

#include <filesystem>
#include <memory>

#include <gtest/gtest.h>

#include "common/digest.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::v1::FodEntry;
using kiln::v1::FodOutcome;
using kiln::v1::FodRef;
using kiln::v1::FodVerdict;

constexpr char kFake[] = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
constexpr char kRight[] = "sha256-sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=";
constexpr char kOther[] = "sha256-fsQI/kYc4PAHcHb/J3W57z40jHx+sLiegND3o08DcGg=";

FodRef Ref(const std::string& inputs, const std::string& name, const std::string& declared) {
  FodRef ref;
  ref.set_key(Sha256Hex(inputs));
  ref.set_name(name);
  ref.set_declared(declared);
  ref.set_drv_path("/nix/store/00000000000000000000000000000000-" + name + ".drv");
  ref.set_algo("sha256");
  ref.set_mode("flat");
  return ref;
}

FodOutcome Outcome(const FodRef& ref, const std::string& got, double seconds = 3) {
  FodOutcome o;
  *o.mutable_fod() = ref;
  o.set_got(got);
  o.set_build_seconds(seconds);
  return o;
}

class FodCacheTest : public ::testing::Test {
 protected:
  void SetUp() override { Open(); }
  void Open() {
    store_.reset();
    auto store = RocksDbStateStore::Open((std::filesystem::path(dir_.path()) / "db").string(), false);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }
  FodCache& cache() { return *store_->fod_cache(); }
  FodVerdict CheckOne(const FodRef& ref) {
    auto v = cache().Check({ref});
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? v->front() : FodVerdict();
  }

  testing::TempDir dir_;
  std::unique_ptr<RocksDbStateStore> store_;
};

TEST_F(FodCacheTest, AComputedHashCatchesFakeAndConfirmsRight) {
  const FodRef fake = Ref("bun.lock v1", "node-modules", kFake);
  EXPECT_EQ(CheckOne(fake).kind(), FodVerdict::KIND_UNKNOWN);
  ASSERT_TRUE(cache().Record({Outcome(fake, kRight)}, "7", "w1").ok());

  FodVerdict caught = CheckOne(fake);
  EXPECT_EQ(caught.kind(), FodVerdict::KIND_WRONG);
  EXPECT_EQ(caught.entry().hash(), kRight);
  EXPECT_EQ(caught.entry().computed_by_job(), "7");
  EXPECT_EQ(caught.entry().computed_by_worker(), "w1");
  EXPECT_EQ(caught.entry().build_seconds(), 3);

  FodVerdict right = CheckOne(Ref("bun.lock v1", "node-modules", kRight));
  EXPECT_EQ(right.kind(), FodVerdict::KIND_RIGHT);
  EXPECT_EQ(right.entry().hit_count(), 2u);  // Both lookups that found it.
}

TEST_F(FodCacheTest, AnOldHashUnderNewInputsIsSuspectedStale) {
  const FodRef v1 = Ref("bun.lock v1", "node-modules", kRight);
  ASSERT_TRUE(cache().Record({Outcome(v1, kRight)}, "1", "w1").ok());  // Verified.
  // The lockfile changed, the declared hash did not.
  FodVerdict stale = CheckOne(Ref("bun.lock v2", "node-modules", kRight));
  EXPECT_EQ(stale.kind(), FodVerdict::KIND_SUSPECT_STALE);
  EXPECT_EQ(stale.stale_source().key(), v1.key());
  // Another derivation name with that hash is no evidence.
  EXPECT_EQ(CheckOne(Ref("go.sum v2", "go-modules", kRight)).kind(), FodVerdict::KIND_UNKNOWN);
  // Once the new inputs are computed, the verdict is definite.
  const FodRef v2 = Ref("bun.lock v2", "node-modules", kRight);
  ASSERT_TRUE(cache().Record({Outcome(v2, kOther)}, "2", "w2").ok());
  FodVerdict wrong = CheckOne(v2);
  EXPECT_EQ(wrong.kind(), FodVerdict::KIND_WRONG);
  EXPECT_EQ(wrong.entry().hash(), kOther);
}

TEST_F(FodCacheTest, DifferentOutputsOfOneKeyMarkItNondeterministic) {
  const FodRef fod = Ref("date > $out", "stamp", kFake);
  ASSERT_TRUE(cache().Record({Outcome(fod, kRight)}, "1", "w1").ok());
  auto odd = cache().Record({Outcome(Ref("date > $out", "stamp", kRight), kOther)}, "2", "w2");
  ASSERT_TRUE(odd.ok()) << odd.status();
  EXPECT_EQ(*odd, std::vector<std::string>{fod.key()});
  FodVerdict v = CheckOne(fod);
  EXPECT_EQ(v.kind(), FodVerdict::KIND_NONDETERMINISTIC);  // Never failed early.
  EXPECT_EQ(v.entry().hash(), kRight);
  EXPECT_EQ(v.entry().other_hash(), kOther);
}

TEST_F(FodCacheTest, BadReportsAreRefusedAndStoreNothing) {
  FodRef bad_key = Ref("x", "x", kFake);
  bad_key.set_key("not-a-key");
  EXPECT_FALSE(cache().Record({Outcome(bad_key, kRight)}, "1", "w").ok());
  EXPECT_FALSE(cache().Record({Outcome(Ref("x", "x", kFake), "sha256:b1778eaf")}, "1", "w").ok());
  EXPECT_FALSE(cache().Record({Outcome(Ref("x", "x", kRight), kFake)}, "1", "w").ok());
  auto all = cache().List("", "", 0);
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->empty());
}

TEST_F(FodCacheTest, ListForgetImportAndReopen) {
  ASSERT_TRUE(
      cache()
          .Record({Outcome(Ref("a", "dep-a", kFake), kRight), Outcome(Ref("b", "dep-b", kFake), kOther)}, "1", "w1")
          .ok());
  auto all = cache().List("", "", 0);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  auto only_b = cache().List("dep-b", "", 0);
  ASSERT_TRUE(only_b.ok());
  ASSERT_EQ(only_b->size(), 1u);
  EXPECT_EQ(only_b->front().hash(), kOther);

  Open();  // Everything is in RocksDB.
  EXPECT_EQ(CheckOne(Ref("a", "dep-a", kFake)).kind(), FodVerdict::KIND_WRONG);

  // Export (List) and import into a fresh database.
  std::vector<FodEntry> exported = *cache().List("", "", 0);
  EXPECT_FALSE(cache().Forget({""}, "").ok());
  EXPECT_FALSE(cache().Forget({"zz"}, "").ok());
  auto forgotten = cache().Forget({Sha256Hex("a").substr(0, 10)}, "");
  ASSERT_TRUE(forgotten.ok()) << forgotten.status();
  EXPECT_EQ(*forgotten, 1u);
  EXPECT_EQ(CheckOne(Ref("a", "dep-a", kFake)).kind(), FodVerdict::KIND_UNKNOWN);
  // The name index went with it: the old hash is no stale evidence now.
  EXPECT_EQ(CheckOne(Ref("a2", "dep-a", kRight)).kind(), FodVerdict::KIND_UNKNOWN);

  auto imported = cache().Import(exported);
  ASSERT_TRUE(imported.ok()) << imported.status();
  EXPECT_EQ(imported->imported(), 1u);
  EXPECT_EQ(imported->skipped(), 1u);
  FodEntry conflicting = exported.front();
  conflicting.set_hash(conflicting.hash() == kRight ? kOther : kRight);
  auto again = cache().Import({conflicting});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->conflicts(), 1u);
  FodRef same_key = Ref("", conflicting.name(), kFake);
  same_key.set_key(conflicting.key());
  EXPECT_EQ(CheckOne(same_key).kind(), FodVerdict::KIND_NONDETERMINISTIC);
  FodEntry broken;
  broken.set_key("nope");
  broken.set_hash(kRight);
  EXPECT_FALSE(cache().Import({broken}).ok());
}

}  // namespace
}  // namespace kiln
