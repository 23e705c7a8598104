// Nix's spellings of a hash, read and normalised to SRI.
//
// A fixed-output hash reaches us written in any of the ways Nix accepts or
// prints: SRI (`sha256-<base64>`), `sha256:<digits>` with base16, Nix's own
// base32 or base64 digits, or bare digits when the algorithm is known from
// elsewhere (a .drv's output tuple, `outputHashAlgo`). Everything Kiln stores
// and prints is SRI, what current Nix prints and what people paste.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

enum class HashAlgo { kMd5, kSha1, kSha256, kSha512 };

absl::StatusOr<HashAlgo> ParseHashAlgo(absl::string_view name);
absl::string_view HashAlgoName(HashAlgo algo);
size_t HashAlgoBytes(HashAlgo algo);

struct NixHash {
  HashAlgo algo = HashAlgo::kSha256;
  std::string bytes;  // The raw digest.

  std::string Sri() const;     // sha256-<base64>
  std::string Base16() const;  // lowercase hex digits only
  std::string Base32() const;  // Nix's base32 digits only
  // All-zero digests: what `lib.fakeHash` and `outputHash = ""` stand for.
  bool IsFake() const;
  bool operator==(const NixHash& other) const { return algo == other.algo && bytes == other.bytes; }
};

// Reads any spelling. `algo` is needed only for bare digits; when given, a
// prefixed spelling must name the same algorithm.
absl::StatusOr<NixHash> ParseNixHash(absl::string_view text, std::optional<HashAlgo> algo = std::nullopt);

// Nix's base32 (alphabet without e, o, u, t; least significant digit last).
std::string EncodeNixBase32(absl::string_view bytes);
absl::StatusOr<std::string> DecodeNixBase32(absl::string_view digits, size_t bytes);

}  // namespace kiln
