// FodHashStore: the fleet's record of what fixed-output derivations hash to,
// as the FodService uses it. FodCache (RocksDB) is the real one.
//
// Thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kiln/v1/fod.pb.h"

namespace kiln {

class FodHashStore {
 public:
  virtual ~FodHashStore() = default;
  // One verdict per FOD, in order; a hit counts on its entry.
  virtual absl::StatusOr<std::vector<kiln::v1::FodVerdict>> Check(const std::vector<kiln::v1::FodRef>& fods) = 0;
  // Stores outcomes: a new key gets an entry; a known key whose hash differs
  // is marked nondeterministic (its keys are returned).
  virtual absl::StatusOr<std::vector<std::string>> Record(const std::vector<kiln::v1::FodOutcome>& outcomes,
                                                          const std::string& job_id, const std::string& worker) = 0;
  // Entries by name and/or key prefix, in key order.
  virtual absl::StatusOr<std::vector<kiln::v1::FodEntry>> List(const std::string& name, const std::string& key_prefix,
                                                               uint32_t limit) const = 0;
  virtual absl::StatusOr<uint32_t> Forget(const std::vector<std::string>& key_prefixes, const std::string& name) = 0;
  virtual absl::StatusOr<kiln::v1::ImportFodsResponse> Import(const std::vector<kiln::v1::FodEntry>& entries) = 0;
  // Entries stored (an estimate).
  virtual uint64_t size() const = 0;
};

}  // namespace kiln
