// Fuzz target: what a registry sends back that Kiln parses — a
// WWW-Authenticate challenge and a JSON error body — and image references
// as users write them.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/image_ref.h"
#include "push/registry_client.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)kiln::ParseAuthParams(text);
  (void)kiln::RegistryErrorSummary(text);
  (void)kiln::ParseImageRef(text);
  return 0;
}
