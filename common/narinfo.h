// Narinfo: what a Nix binary cache says of one store path (`HASH.narinfo`),
// and the Ed25519 signatures Nix puts on it. The text is Nix's own
// `Key: value` lines; the signature covers Nix's fingerprint
// `1;STOREPATH;NARHASH;NARSIZE;REF,REF,…` (NARHASH as `sha256:` + Nix
// base32, references as full store paths), so stock Nix verifies what Kiln
// signs and the other way round.
//
// Keys are Nix's files: a secret key `NAME:base64(seed ‖ public key)` (64
// bytes, as `nix-store --generate-binary-cache-key` writes) and a public
// key `NAME:base64(public key)` (32 bytes), the `trusted-public-keys` entry.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct NarInfo {
  std::string store_path;  // /nix/store/HASH-NAME
  std::string url;         // nar/FILEHASH.nar.zst
  std::string compression = "none";
  std::string file_hash;  // sha256:BASE32 of the file as served (compressed).
  uint64_t file_size = 0;
  std::string nar_hash;  // sha256:BASE32 of the NAR.
  uint64_t nar_size = 0;
  std::vector<std::string> references;  // Base names (HASH-NAME), sorted.
  std::string deriver;                  // Base name of the .drv; may be empty.
  std::string ca;                       // Content address (fixed outputs), e.g. fixed:r:sha256:…
  std::vector<std::string> sigs;        // NAME:base64

  // Nix's fingerprint of the path, what a signature covers.
  std::string Fingerprint() const;
  std::string Render() const;
};

// Parses a narinfo; unknown keys are skipped (Nix adds some over time),
// missing required ones (StorePath, URL, NarHash, NarSize) are an error.
// Bounded: at most 1 MiB of text and 65,536 references.
absl::StatusOr<NarInfo> ParseNarInfo(absl::string_view text);

// A path's hash part: the 32 characters after /nix/store/.
absl::StatusOr<std::string> StorePathHashPart(absl::string_view store_path);

class SigningKey {
 public:
  // From Nix's secret key text (a file's content; surrounding whitespace
  // ignored). Errors never quote the key.
  static absl::StatusOr<SigningKey> Parse(absl::string_view secret_key_text);
  // A new key named `name` (e.g. "kiln-farm-1").
  static absl::StatusOr<SigningKey> Generate(absl::string_view name);

  const std::string& name() const { return name_; }
  std::string SecretKeyText() const;  // NAME:base64(seed ‖ public)
  std::string PublicKeyText() const;  // NAME:base64(public)
  // NAME:base64(Ed25519 signature of `fingerprint`).
  absl::StatusOr<std::string> Sign(absl::string_view fingerprint) const;

 private:
  std::string name_;
  std::string seed_;    // 32 bytes.
  std::string public_;  // 32 bytes.
};

// Whether `sig` (NAME:base64) is a valid signature of `fingerprint` by one
// of `public_keys` (NAME:base64 each, as in trusted-public-keys).
bool VerifySignature(absl::string_view fingerprint, absl::string_view sig, const std::vector<std::string>& public_keys);

}  // namespace kiln
