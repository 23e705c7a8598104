// The farm store's garbage collection: a property test of the plan over
// random graphs (the closure property holds after every collection, pinned
// closures stay, least recently used go first, the target is met unless
// what is left is needed), and the collection carried out on a real
// LocalFarmStore (records and files go, a restart agrees, an upload whose
// reference was collected is refused).
#include "coordinator/farm_store_gc.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <random>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/numbers.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/digest.h"
#include "common/nix_hash.h"
#include "coordinator/farm_store.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/nar_builder.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

std::string HashPart(size_t i) {
  std::string h = absl::StrCat(i);
  return std::string(32 - h.size(), '0') + h;
}

TEST(FarmGcPlanTest, NeverBreaksAClosureNorAPinAndTakesTheOldestFirst) {
  std::mt19937 rng(20261207);
  for (int round = 0; round < 300; ++round) {
    const size_t n = 1 + rng() % 60;
    std::vector<FarmGcNode> nodes(n);
    for (size_t i = 0; i < n; ++i) {
      nodes[i].hash_part = HashPart(i);
      // References point to lower indices only: a DAG, as store paths make.
      for (size_t r = 0; r < i; ++r) {
        if (rng() % 100 < 8) nodes[i].references.push_back(HashPart(r));
      }
      if (rng() % 4 == 0) nodes[i].references.push_back(HashPart(i));  // Self-references are common.
      // Some paths share a NAR file (the same contents under two names).
      nodes[i].file = rng() % 10 == 0 && i > 0 ? nodes[rng() % i].file : absl::StrCat("f", i);
      nodes[i].file_bytes = 1 + rng() % 1000;
      nodes[i].last_used = absl::FromUnixSeconds(static_cast<int64_t>(rng() % 100));
    }
    // Shared files have one size.
    absl::flat_hash_map<std::string, uint64_t> file_size;
    for (FarmGcNode& node : nodes) node.file_bytes = file_size.try_emplace(node.file, node.file_bytes).first->second;
    absl::flat_hash_set<std::string> pins;
    for (size_t i = 0; i < n; ++i) {
      if (rng() % 10 == 0) pins.insert(HashPart(i));
    }
    uint64_t total = 0;
    for (const auto& [f, size] : file_size) total += size;
    const uint64_t max = total * (rng() % 100) / 100;
    const uint64_t target = max * (rng() % 100) / 100;

    const FarmGcPlan plan = PlanFarmGc(nodes, pins, max, target);
    SCOPED_TRACE(absl::StrCat("round ", round, ": ", n, " paths, ", total, " bytes, max ", max, ", target ", target));
    EXPECT_EQ(plan.bytes_before, total);
    absl::flat_hash_set<std::string> gone(plan.collect.begin(), plan.collect.end());
    ASSERT_EQ(gone.size(), plan.collect.size()) << "a path collected twice";
    // 1. Every path left has everything it references.
    for (const FarmGcNode& node : nodes) {
      if (gone.contains(node.hash_part)) continue;
      for (const std::string& r : node.references) EXPECT_FALSE(gone.contains(r)) << node.hash_part << " -> " << r;
    }
    // 2. Pinned closures stay.
    std::vector<std::string> todo(pins.begin(), pins.end());
    absl::flat_hash_set<std::string> closure;
    while (!todo.empty()) {
      const std::string h = todo.back();
      todo.pop_back();
      if (!closure.insert(h).second) continue;
      EXPECT_FALSE(gone.contains(h)) << "pinned " << h;
      uint64_t i = 0;
      ASSERT_TRUE(absl::SimpleAtoi(h, &i));
      for (const std::string& r : nodes[i].references) todo.push_back(r);
    }
    // 3. The bytes left are what the files of the paths left take; a file is
    // freed only when no path left names it.
    absl::flat_hash_map<std::string, uint64_t> left_files;
    for (const FarmGcNode& node : nodes) {
      if (!gone.contains(node.hash_part)) left_files[node.file] = node.file_bytes;
    }
    uint64_t left = 0;
    for (const auto& [f, size] : left_files) left += size;
    EXPECT_EQ(plan.bytes_after, left);
    for (const std::string& f : plan.files_freed) EXPECT_FALSE(left_files.contains(f)) << f;
    // 4. Nothing when under the limit; else down to the target, unless every
    // path left is pinned or referenced by a path left.
    if (total <= max) {
      EXPECT_TRUE(plan.collect.empty());
      continue;
    }
    if (plan.bytes_after > target) {
      for (const FarmGcNode& node : nodes) {
        if (gone.contains(node.hash_part) || closure.contains(node.hash_part)) continue;
        bool referenced = false;
        for (const FarmGcNode& other : nodes) {
          if (gone.contains(other.hash_part) || other.hash_part == node.hash_part) continue;
          for (const std::string& r : other.references) referenced |= r == node.hash_part;
        }
        EXPECT_TRUE(referenced) << node.hash_part << " could have gone";
      }
    }
    // 5. Least recently used first: each collected path was, when taken, no
    // younger than any other path that could have been taken then.
    absl::flat_hash_set<std::string> taken;
    for (const std::string& h : plan.collect) {
      uint64_t i = 0;
      ASSERT_TRUE(absl::SimpleAtoi(h, &i));
      for (const FarmGcNode& cand : nodes) {
        if (taken.contains(cand.hash_part) || cand.hash_part == h || closure.contains(cand.hash_part)) continue;
        bool free = true;
        for (const FarmGcNode& other : nodes) {
          if (taken.contains(other.hash_part) || other.hash_part == cand.hash_part) continue;
          for (const std::string& r : other.references) free &= r != cand.hash_part;
        }
        if (free) EXPECT_LE(nodes[i].last_used, cand.last_used) << h << " taken before older " << cand.hash_part;
      }
      taken.insert(h);
    }
  }
}

using testing::Announce;

absl::Status Add(FarmStore& store, const NarInfo& info, const std::string& nar) {
  size_t at = 0;
  return store.Add(info, [&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min(size, nar.size() - at);
    std::memcpy(buf, nar.data() + at, n);
    at += n;
    return n;
  });
}

std::string Path(char c, const std::string& name) { return absl::StrCat("/nix/store/", std::string(32, c), "-", name); }

TEST(FarmStoreGcTest, CollectsLeastRecentlyUsedLeavesKeepsPinsAndARestartAgrees) {
  testing::TempDir dir;
  auto opened = RocksDbStateStore::Open(dir.Sub("rocksdb"), /*sync=*/false);
  ASSERT_TRUE(opened.ok()) << opened.status();
  std::unique_ptr<RocksDbStateStore> state = *std::move(opened);
  FarmStore& store = *state->farm_store();
  // lib <- app, lib <- tool; old stands alone; pinned-app <- pinned.
  const std::string lib = Path('a', "lib"), app = Path('b', "app"), tool = Path('c', "tool"), old = Path('d', "old"),
                    pin = Path('f', "pinned");
  std::map<std::string, std::string> nars;
  for (const std::string& p : {lib, app, tool, old, pin}) {
    nars[p] = testing::NarArchive(testing::NarFile(absl::StrCat(p, std::string(4000, 'x'))));
  }
  ASSERT_TRUE(Add(store, Announce(lib, nars[lib]), nars[lib]).ok());
  ASSERT_TRUE(Add(store, Announce(app, nars[app], {lib}), nars[app]).ok());
  ASSERT_TRUE(Add(store, Announce(tool, nars[tool], {lib}), nars[tool]).ok());
  ASSERT_TRUE(Add(store, Announce(old, nars[old]), nars[old]).ok());
  ASSERT_TRUE(Add(store, Announce(pin, nars[pin]), nars[pin]).ok());
  const FarmStoreStats before = store.Stats();
  EXPECT_EQ(before.paths, 5u);

  // Under the limit: nothing.
  FarmGcPolicy policy;
  policy.max_bytes = before.file_bytes;
  policy.target_bytes = 0;
  policy.pinned_roots = {pin};
  absl::StatusOr<FarmGcReport> report = store.CollectGarbage(policy);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->paths_collected, 0u);

  // Everything unpinned may go: the referrers first, then lib.
  policy.max_bytes = before.file_bytes - 1;
  report = store.CollectGarbage(policy);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->paths_collected, 4u);
  EXPECT_EQ(report->paths_pinned, 1u);
  EXPECT_EQ(report->paths_left, 1u);
  absl::StatusOr<std::vector<std::string>> missing = store.Missing({lib, app, tool, old, pin});
  ASSERT_TRUE(missing.ok());
  EXPECT_EQ(*missing, (std::vector<std::string>{lib, app, tool, old}));
  size_t files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.Sub("rocksdb/nar"))) files += e.is_regular_file();
  EXPECT_EQ(files, 1u);

  // An upload whose reference is gone is refused; it goes through again
  // once the reference is back.
  EXPECT_EQ(Add(store, Announce(app, nars[app], {lib}), nars[app]).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(Add(store, Announce(lib, nars[lib]), nars[lib]).ok());
  ASSERT_TRUE(Add(store, Announce(app, nars[app], {lib}), nars[app]).ok());

  // A restart counts the same.
  const FarmStoreStats now = store.Stats();
  state.reset();
  opened = RocksDbStateStore::Open(dir.Sub("rocksdb"), /*sync=*/false);
  ASSERT_TRUE(opened.ok()) << opened.status();
  state = *std::move(opened);
  EXPECT_EQ(state->farm_store()->Stats().paths, now.paths);
  EXPECT_EQ(state->farm_store()->Stats().file_bytes, now.file_bytes);
  EXPECT_EQ(now.paths, 3u);
}

}  // namespace
}  // namespace kiln
