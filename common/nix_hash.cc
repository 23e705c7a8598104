#include "common/nix_hash.h"

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace kiln {
namespace {

constexpr absl::string_view kBase32Digits = "0123456789abcdfghijklmnpqrsvwxyz";

size_t Base32Length(size_t bytes) { return (bytes * 8 - 1) / 5 + 1; }
size_t Base64Length(size_t bytes) { return (bytes + 2) / 3 * 4; }

absl::StatusOr<std::string> DecodeDigits(absl::string_view digits, HashAlgo algo) {
  const size_t n = HashAlgoBytes(algo);
  std::string bytes;
  if (digits.size() == 2 * n) {
    for (char c : digits) {
      if (!absl::ascii_isxdigit(c)) return absl::InvalidArgumentError(absl::StrCat("'", digits, "' is not base16"));
    }
    return absl::HexStringToBytes(absl::AsciiStrToLower(digits));
  }
  if (digits.size() == Base32Length(n)) return DecodeNixBase32(digits, n);
  if (digits.size() == Base64Length(n)) {
    if (!absl::Base64Unescape(digits, &bytes) || bytes.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("'", digits, "' is not base64"));
    }
    return bytes;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", digits, "' has the wrong length for a ", HashAlgoName(algo), " hash"));
}

}  // namespace

absl::StatusOr<HashAlgo> ParseHashAlgo(absl::string_view name) {
  if (name == "sha256") return HashAlgo::kSha256;
  if (name == "sha512") return HashAlgo::kSha512;
  if (name == "sha1") return HashAlgo::kSha1;
  if (name == "md5") return HashAlgo::kMd5;
  return absl::InvalidArgumentError(absl::StrCat("unknown hash algorithm '", name, "'"));
}

absl::string_view HashAlgoName(HashAlgo algo) {
  switch (algo) {
    case HashAlgo::kMd5: return "md5";
    case HashAlgo::kSha1: return "sha1";
    case HashAlgo::kSha256: return "sha256";
    case HashAlgo::kSha512: return "sha512";
  }
  return "sha256";
}

size_t HashAlgoBytes(HashAlgo algo) {
  switch (algo) {
    case HashAlgo::kMd5: return 16;
    case HashAlgo::kSha1: return 20;
    case HashAlgo::kSha256: return 32;
    case HashAlgo::kSha512: return 64;
  }
  return 32;
}

std::string NixHash::Sri() const { return absl::StrCat(HashAlgoName(algo), "-", absl::Base64Escape(bytes)); }
std::string NixHash::Base16() const { return absl::BytesToHexString(bytes); }
std::string NixHash::Base32() const { return EncodeNixBase32(bytes); }

bool NixHash::IsFake() const {
  for (char c : bytes) {
    if (c != 0) return false;
  }
  return true;
}

std::string EncodeNixBase32(absl::string_view bytes) {
  const size_t len = Base32Length(bytes.size());
  std::string out;
  out.reserve(len);
  // The most significant 5-bit group comes first; group n starts at bit 5n
  // of the little-endian digest.
  for (size_t n = len; n-- > 0;) {
    const size_t bit = n * 5;
    const size_t i = bit / 8;
    const size_t j = bit % 8;
    unsigned value = static_cast<unsigned char>(bytes[i]) >> j;
    if (i + 1 < bytes.size()) value |= static_cast<unsigned>(static_cast<unsigned char>(bytes[i + 1])) << (8 - j);
    out.push_back(kBase32Digits[value & 0x1f]);
  }
  return out;
}

absl::StatusOr<std::string> DecodeNixBase32(absl::string_view digits, size_t bytes) {
  if (digits.size() != Base32Length(bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("'", digits, "' is not ", Base32Length(bytes), " base32 digits"));
  }
  std::string out(bytes, '\0');
  for (size_t n = 0; n < digits.size(); ++n) {
    const size_t digit = kBase32Digits.find(digits[digits.size() - n - 1]);
    if (digit == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("'", digits, "' is not Nix base32"));
    }
    const size_t bit = n * 5;
    const size_t i = bit / 8;
    const size_t j = bit % 8;
    out[i] = static_cast<char>(static_cast<unsigned char>(out[i]) | ((digit << j) & 0xff));
    const unsigned carry = static_cast<unsigned>(digit >> (8 - j));
    if (i + 1 < bytes) {
      out[i + 1] = static_cast<char>(static_cast<unsigned char>(out[i + 1]) | carry);
    } else if (carry != 0) {
      return absl::InvalidArgumentError(absl::StrCat("'", digits, "' overflows a ", bytes, "-byte hash"));
    }
  }
  return out;
}

absl::StatusOr<NixHash> ParseNixHash(absl::string_view text, std::optional<HashAlgo> algo) {
  text = absl::StripAsciiWhitespace(text);
  NixHash hash;
  absl::string_view digits = text;
  bool sri = false;
  if (size_t sep = text.find_first_of(":-"); sep != absl::string_view::npos) {
    absl::StatusOr<HashAlgo> named = ParseHashAlgo(text.substr(0, sep));
    if (!named.ok())
      return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a hash: ", named.status().message()));
    if (algo && *algo != *named) {
      return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a ", HashAlgoName(*algo), " hash"));
    }
    algo = *named;
    sri = text[sep] == '-';
    digits = text.substr(sep + 1);
  }
  if (!algo) return absl::InvalidArgumentError(absl::StrCat("'", text, "' does not say its hash algorithm"));
  hash.algo = *algo;
  if (sri) {
    if (!absl::Base64Unescape(digits, &hash.bytes) || hash.bytes.size() != HashAlgoBytes(*algo)) {
      return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a valid SRI hash"));
    }
    return hash;
  }
  absl::StatusOr<std::string> bytes = DecodeDigits(digits, *algo);
  if (!bytes.ok()) return bytes.status();
  hash.bytes = *std::move(bytes);
  return hash;
}

}  // namespace kiln
