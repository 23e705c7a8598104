// FakeObjectStore: an in-memory bucket behind the ObjectStore seam, for the
// object-storage farm store's own rules (what is written when, what a crash
// leaves). A fake: it speaks no HTTP; its "presigned URLs" are fake://
// strings, and a test plays the uploader by calling Put itself. The real
// S3 client is tested against moto (coordinator/object_store_test.cc).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "coordinator/object_store.h"

namespace kiln::testing {

class FakeObjectStore final : public ObjectStore {
 public:
  absl::Status Put(const std::string& key, absl::string_view body, absl::string_view) override {
    absl::MutexLock lock(&mu_);
    log_.push_back("PUT " + key);
    if (!fail_prefix_.empty() && absl::StartsWith(key, fail_prefix_)) {
      return absl::UnavailableError("fake outage");
    }
    objects_[key] = std::string(body);
    return absl::OkStatus();
  }
  absl::Status PutFile(const std::string& key, const std::string& file, absl::string_view type) override {
    std::string data;
    if (FILE* f = std::fopen(file.c_str(), "rb"); f != nullptr) {
      char buf[65536];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.append(buf, n);
      std::fclose(f);
    } else {
      return absl::NotFoundError(file);
    }
    return Put(key, data, type);
  }
  absl::StatusOr<uint64_t> Size(const std::string& key) override {
    absl::MutexLock lock(&mu_);
    auto it = objects_.find(key);
    if (it == objects_.end()) return absl::NotFoundError(key);
    return it->second.size();
  }
  absl::Status Get(const std::string& key, absl::FunctionRef<absl::Status(absl::string_view)> sink) override {
    std::string data;
    {
      absl::MutexLock lock(&mu_);
      auto it = objects_.find(key);
      if (it == objects_.end()) return absl::NotFoundError(key);
      data = it->second;
    }
    return sink(data);
  }
  absl::Status Delete(const std::string& key) override {
    absl::MutexLock lock(&mu_);
    log_.push_back("DELETE " + key);
    objects_.erase(key);
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> PresignedUrl(absl::string_view method, const std::string& key, absl::Duration) override {
    return absl::StrCat("fake://", method, "/", key);
  }
  std::string PublicUrl() const override { return "fake://bucket"; }

  std::map<std::string, std::string> objects() const {
    absl::MutexLock lock(&mu_);
    return objects_;
  }
  std::vector<std::string> log() const {
    absl::MutexLock lock(&mu_);
    return log_;
  }
  // PUTs of keys starting with `prefix` fail from now on ("" : none).
  void FailPutsOf(std::string prefix) {
    absl::MutexLock lock(&mu_);
    fail_prefix_ = std::move(prefix);
  }

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, std::string> objects_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> log_ ABSL_GUARDED_BY(mu_);
  std::string fail_prefix_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kiln::testing
