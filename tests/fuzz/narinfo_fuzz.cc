// Fuzz target: narinfo text (common/narinfo.h), what a binary cache client
// and the farm store read. Invariants, checked with abort():
//   - an accepted narinfo renders to text that parses to the same narinfo
//     (its rendering and fingerprint unchanged);
//   - every accepted reference is a store path's base name (no '/').
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/narinfo.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto info = kiln::ParseNarInfo(text);
  if (!info.ok()) return 0;
  for (const std::string& r : info->references) Check(r.find('/') == std::string::npos);
  // Values are single lines: a rendering parses back only if none holds a
  // newline, which the parser guarantees by splitting on them.
  auto again = kiln::ParseNarInfo(info->Render());
  Check(again.ok());
  Check(again->Render() == info->Render());
  Check(again->Fingerprint() == info->Fingerprint());
  return 0;
}
