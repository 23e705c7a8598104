// NARs built by hand for tests: every token a length-prefixed, zero-padded
// string (see common/nar.h), so a test can make well-formed and malformed
// archives alike.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/digest.h"
#include "common/narinfo.h"
#include "common/nix_hash.h"

namespace kiln::testing {

// One NAR string token: length (u64, little-endian), bytes, zero padding.
inline std::string NarString(absl::string_view s) {
  std::string out;
  const uint64_t n = s.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out.append(s.data(), s.size());
  out.append((8 - s.size() % 8) % 8, '\0');
  return out;
}
inline std::string NarFile(absl::string_view contents) {
  return NarString("(") + NarString("type") + NarString("regular") + NarString("contents") + NarString(contents) +
         NarString(")");
}
inline std::string NarDirectory(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out = NarString("(") + NarString("type") + NarString("directory");
  for (const auto& [name, node] : entries) {
    out += NarString("entry") + NarString("(") + NarString("name") + NarString(name) + NarString("node") + node +
           NarString(")");
  }
  return out + NarString(")");
}
inline std::string NarArchive(const std::string& node) { return NarString("nix-archive-1") + node; }

// What a client announces for `nar` at `path`: its size and hash.
inline NarInfo Announce(const std::string& path, const std::string& nar, std::vector<std::string> refs = {}) {
  NixHash h;
  h.algo = HashAlgo::kSha256;
  h.bytes = absl::HexStringToBytes(Sha256Hex(nar));
  NarInfo info;
  info.store_path = path;
  info.nar_hash = absl::StrCat("sha256:", h.Base32());
  info.nar_size = nar.size();
  info.references = std::move(refs);
  return info;
}

}  // namespace kiln::testing
