// The worker's source cache (WORK_DIR/cas: blobs by digest, least recently
// used trimmed past a size) and the checkouts made from it.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kiln/v1/cas.grpc.pb.h"
#include "kiln/v1/workers.pb.h"

namespace kiln {

// Removes from WORK_DIR/cas the temporary files of writes that never
// finished (a worker killed mid-write): at start, with the other clean-up of
// what a previous run left, before the worker says it is ready.
void SweepSourceCacheLeftovers(const std::string& work_dir);

class SourceCache {
 public:
  // `cas`: the coordinator's CAS, where missing blobs come from; it must
  // outlive the cache.
  SourceCache(std::string work_dir, uint64_t max_bytes, kiln::v1::CasService::Stub* cas)
      : work_dir_(std::move(work_dir)), max_bytes_(max_bytes), cas_(cas) {}

  // Checks the flake's own directory of the job's source tree out into
  // `dest`: blobs sent with the assignment, else from the cache, else
  // fetched from the coordinator's CAS into the cache. A source that cannot
  // fit on the work directory's disk fails first, saying so
  // (RESOURCE_EXHAUSTED: "no space left on the worker's work directory").
  // Thread-safe: jobs check out concurrently.
  absl::Status CheckOut(const kiln::v1::Assignment& assignment, const std::string& dest);

 private:
  // Deletes the least recently used blobs past `max_bytes_`.
  void Trim();

  const std::string work_dir_;
  const uint64_t max_bytes_;
  kiln::v1::CasService::Stub* const cas_;
};

}  // namespace kiln
