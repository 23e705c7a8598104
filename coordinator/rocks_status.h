// RocksDB's status as an absl::Status, for every user of the coordinator's
// database (state store, CAS, FOD cache).
#pragma once

#include <rocksdb/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kiln {

// OK stays OK; otherwise "WHAT: rocksdb's message" with a code that says
// what the caller may do (NotFound, DataLoss, Unavailable for transient
// contention, ResourceExhausted for a full disk, Internal otherwise).
absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what);

// A write that failed because the disk is full (ENOSPC, EDQUOT), from
// RocksDB or from the CAS's own files.
bool IsDiskFull(const absl::Status& s);

}  // namespace kiln
