// RocksDB's status as an absl::Status, for every user of the coordinator's
// database (state store, CAS, FOD cache).
#pragma once

#include <rocksdb/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// OK stays OK; otherwise "WHAT: rocksdb's message" with a code that says
// what the caller may do (NotFound, DataLoss, Unavailable for transient
// contention, Internal otherwise).
absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what);

}  // namespace kiln
