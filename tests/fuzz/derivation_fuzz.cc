// Fuzz target: a .drv file in ATerm form, then the FOD key of what parsed.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/derivation.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<kiln::Derivation> drv = kiln::ParseDerivation(text);
  if (!drv.ok()) return 0;
  std::optional<kiln::FixedOutput> fod = kiln::GetFixedOutput(*drv);
  // The key is a SHA-256 in hex whenever there is a fixed output.
  if (fod.has_value() && fod->key.size() != 64) __builtin_trap();
  (void)kiln::StorePathName(text);
  return 0;
}
