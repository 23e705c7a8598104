// The farm store's garbage collection, as a pure plan over the store's
// records (LocalFarmStore::CollectGarbage carries it out). Kept apart so
// that its rules can be checked over many random graphs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/time/time.h"

namespace kiln {

struct FarmGcNode {
  std::string hash_part;
  std::vector<std::string> references;  // Hash parts (itself allowed, ignored).
  std::string file;                     // Its NAR file's name; paths may share one.
  uint64_t file_bytes = 0;
  absl::Time last_used;
};

struct FarmGcPlan {
  std::vector<std::string> collect;      // Hash parts, in the order chosen.
  std::vector<std::string> files_freed;  // Named by no path left.
  uint64_t bytes_before = 0, bytes_after = 0;
  uint64_t pinned = 0;  // Paths in the pinned closures.
};

// What to collect to bring the files' total from above `max_bytes` down to
// `target_bytes`: least recently used first among the paths no other path
// left references, never a path in the closure of `pinned_roots` (hash
// parts). Nothing when the total is at most `max_bytes`. It stops short of
// the target when the rest is pinned or needed.
FarmGcPlan PlanFarmGc(const std::vector<FarmGcNode>& nodes, const absl::flat_hash_set<std::string>& pinned_roots,
                      uint64_t max_bytes, uint64_t target_bytes);

}  // namespace kiln
