#include "worker/build_executor.h"

#include <utility>

namespace kiln {

void DerivationHandOver::Give(std::string drv_path) {
  absl::MutexLock lock(&mu_);
  if (decided_) return;  // Withdrawn first (a cancel): that stands.
  decided_ = true;
  drv_path_ = std::move(drv_path);
}

void DerivationHandOver::Withdraw() {
  absl::MutexLock lock(&mu_);
  decided_ = true;
}

std::optional<std::string> DerivationHandOver::Await() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&decided_));
  return drv_path_;
}

}  // namespace kiln
