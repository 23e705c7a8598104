// Fuzz target: the NAR reader (common/nar.h), what the farm store reads
// from the network. Invariants, checked with abort():
//   - an accepted NAR's size is exactly the input's;
//   - the verdict and summary do not depend on how the bytes arrive (read
//     whole, or a few bytes at a time as a network stream would give them);
//   - what a summary counts is bounded by the input's size.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/nar.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string nar(reinterpret_cast<const char*>(data), size);
  kiln::NarLimits limits;
  limits.max_nar_bytes = 1 << 20;
  limits.max_depth = 32;
  auto whole = kiln::ReadNar(nar, limits);
  size_t at = 0, step = 1;
  auto pieces = kiln::ReadNar(
      [&](char* buf, size_t room) -> absl::StatusOr<size_t> {
        const size_t n = std::min({room, size - at, step});
        std::memcpy(buf, nar.data() + at, n);
        at += n;
        step = step % 13 + 1;  // 1..13 bytes at a time.
        return n;
      },
      limits);
  Check(whole.ok() == pieces.ok());
  if (!whole.ok()) {
    Check(whole.status().code() == pieces.status().code());
    return 0;
  }
  Check(whole->nar_bytes == size && pieces->nar_bytes == size);
  Check(whole->sha256 == pieces->sha256 && whole->sha256.size() == 32);
  Check(whole->content_bytes < size);
  Check(whole->regular_files + whole->directories + whole->symlinks <= size / 40);
  Check(whole->executables <= whole->regular_files);
  return 0;
}
