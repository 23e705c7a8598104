// Fuzz target: Nix's output as workers read it — every stderr line through
// the log parser, the whole text through the hash-mismatch parser, and the
// text as `nix build --json` output.
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/str_split.h"
#include "common/hash_mismatch.h"
#include "common/nix_log.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  kiln::NixLogParser parser;
  for (absl::string_view line : absl::StrSplit(text, '\n')) (void)parser.ParseLine(line);
  (void)kiln::ParseHashMismatches(text);
  (void)kiln::ParseNixBuildJson(text);
  (void)kiln::StripAnsi(text);
  return 0;
}
