// NixServeConnection: a long-lived `nix-store --serve` child of the worker,
// asked for what its store records of a closure (the serve protocol's
// QueryClosure and QueryPathInfos: a millisecond each, where a `nix
// path-info` process costs 20-25 ms of Nix's start-up on every upload).
//
// The child starts on first use and is started again after any error; every
// read is bounded by a deadline, after which the child is killed. Callers
// fall back to `nix path-info` on an error.
//
// Thread-safe (one question at a time).
#pragma once

#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kiln/v1/store.pb.h"

namespace kiln {

class NixServeConnection {
 public:
  NixServeConnection(std::string nix_store_binary, std::vector<std::pair<std::string, std::string>> options,
                     absl::Duration deadline = absl::Seconds(60))
      : nix_store_binary_(std::move(nix_store_binary)), options_(std::move(options)), deadline_(deadline) {}
  ~NixServeConnection();

  // Every valid path in the closure of `roots`, with what the store records
  // (narHash as Nix prints it, base32); NOT_FOUND if a root is not valid.
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> ClosureInfos(const std::vector<std::string>& roots)
      ABSL_LOCKS_EXCLUDED(mu_);

 private:
  absl::Status StartLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StopLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Write(const std::string& bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Read(char* buf, size_t n, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<uint64_t> ReadU64(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::string> ReadString(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<std::string>> ReadStrings(absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<std::vector<kiln::v1::PathInfo>> AskLocked(const std::vector<std::string>& roots)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string nix_store_binary_;
  const std::vector<std::pair<std::string, std::string>> options_;
  const absl::Duration deadline_;
  absl::Mutex mu_;
  pid_t pid_ ABSL_GUARDED_BY(mu_) = -1;
  int to_child_ ABSL_GUARDED_BY(mu_) = -1;
  int from_child_ ABSL_GUARDED_BY(mu_) = -1;
};

}  // namespace kiln
