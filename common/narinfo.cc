#include "common/narinfo.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <memory>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kiln {
namespace {

constexpr size_t kMaxNarInfoBytes = 1 << 20;
constexpr size_t kMaxReferences = 65536;
constexpr size_t kKeyBytes = 32;
constexpr size_t kSignatureBytes = 64;

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct MdCtxFree {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxFree>;

// NAME:base64 → name and decoded bytes of `bytes` length.
bool SplitNamed(absl::string_view text, size_t bytes, std::string* name, std::string* decoded) {
  const size_t colon = text.find(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  *name = std::string(text.substr(0, colon));
  return absl::Base64Unescape(text.substr(colon + 1), decoded) && decoded->size() == bytes;
}

std::string StoreDirOf(absl::string_view store_path) {
  const size_t slash = store_path.rfind('/');
  return std::string(slash == absl::string_view::npos ? "/nix/store" : store_path.substr(0, slash));
}

}  // namespace

absl::StatusOr<std::string> StorePathHashPart(absl::string_view store_path) {
  const size_t slash = store_path.rfind('/');
  const absl::string_view base = slash == absl::string_view::npos ? store_path : store_path.substr(slash + 1);
  if (base.size() < 34 || base[32] != '-') {
    return absl::InvalidArgumentError(
        absl::StrCat("not a store path: '", absl::CHexEscape(store_path.substr(0, 200)), "'"));
  }
  for (char c : base.substr(0, 32)) {
    if (!absl::ascii_isdigit(c) && !(c >= 'a' && c <= 'z' && c != 'e' && c != 'o' && c != 'u' && c != 't')) {
      return absl::InvalidArgumentError(
          absl::StrCat("not a store path: '", absl::CHexEscape(base.substr(0, 200)), "'"));
    }
  }
  return std::string(base.substr(0, 32));
}

std::string NarInfo::Fingerprint() const {
  const std::string dir = StoreDirOf(store_path);
  std::vector<std::string> refs;
  refs.reserve(references.size());
  for (const std::string& r : references) refs.push_back(absl::StrCat(dir, "/", r));
  return absl::StrCat("1;", store_path, ";", nar_hash, ";", nar_size, ";", absl::StrJoin(refs, ","));
}

std::string NarInfo::Render() const {
  std::string out = absl::StrCat("StorePath: ", store_path, "\nURL: ", url, "\nCompression: ", compression, "\n");
  if (!file_hash.empty()) absl::StrAppend(&out, "FileHash: ", file_hash, "\nFileSize: ", file_size, "\n");
  absl::StrAppend(&out, "NarHash: ", nar_hash, "\nNarSize: ", nar_size,
                  "\nReferences: ", absl::StrJoin(references, " "), "\n");
  if (!deriver.empty()) absl::StrAppend(&out, "Deriver: ", deriver, "\n");
  for (const std::string& sig : sigs) absl::StrAppend(&out, "Sig: ", sig, "\n");
  if (!ca.empty()) absl::StrAppend(&out, "CA: ", ca, "\n");
  return out;
}

absl::StatusOr<NarInfo> ParseNarInfo(absl::string_view text) {
  if (text.size() > kMaxNarInfoBytes) return absl::InvalidArgumentError("narinfo larger than 1 MiB");
  NarInfo info;
  bool has_nar_size = false;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    const size_t colon = line.find(": ");
    if (colon == absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("narinfo line without 'Key: value': '", absl::CHexEscape(line.substr(0, 100)), "'"));
    }
    const absl::string_view key = line.substr(0, colon), value = line.substr(colon + 2);
    if (key == "StorePath") {
      if (!StorePathHashPart(value).ok()) return absl::InvalidArgumentError("narinfo StorePath is not a store path");
      info.store_path = std::string(value);
    } else if (key == "URL") {
      info.url = std::string(value);
    } else if (key == "Compression") {
      info.compression = std::string(value);
    } else if (key == "FileHash") {
      info.file_hash = std::string(value);
    } else if (key == "FileSize") {
      if (!absl::SimpleAtoi(value, &info.file_size))
        return absl::InvalidArgumentError("narinfo FileSize is not a number");
    } else if (key == "NarHash") {
      info.nar_hash = std::string(value);
    } else if (key == "NarSize") {
      if (!absl::SimpleAtoi(value, &info.nar_size))
        return absl::InvalidArgumentError("narinfo NarSize is not a number");
      has_nar_size = true;
    } else if (key == "References") {
      for (absl::string_view r : absl::StrSplit(value, ' ', absl::SkipEmpty())) {
        if (info.references.size() >= kMaxReferences)
          return absl::InvalidArgumentError("narinfo with too many references");
        if (!StorePathHashPart(r).ok() || absl::StrContains(r, '/')) {
          return absl::InvalidArgumentError("narinfo reference is not a store path's name");
        }
        info.references.emplace_back(r);
      }
    } else if (key == "Deriver") {
      if (value != "unknown-deriver") info.deriver = std::string(value);
    } else if (key == "Sig") {
      info.sigs.emplace_back(value);
    } else if (key == "CA") {
      info.ca = std::string(value);
    }
  }
  if (info.store_path.empty() || info.url.empty() || info.nar_hash.empty() || !has_nar_size) {
    return absl::InvalidArgumentError("narinfo lacks one of StorePath, URL, NarHash, NarSize");
  }
  return info;
}

absl::StatusOr<SigningKey> SigningKey::Parse(absl::string_view secret_key_text) {
  std::string name, bytes;
  if (!SplitNamed(absl::StripAsciiWhitespace(secret_key_text), 2 * kKeyBytes, &name, &bytes)) {
    return absl::InvalidArgumentError("not a Nix secret key (NAME:base64 of 64 bytes)");
  }
  SigningKey key;
  key.name_ = std::move(name);
  key.seed_ = bytes.substr(0, kKeyBytes);
  key.public_ = bytes.substr(kKeyBytes);
  OPENSSL_cleanse(bytes.data(), bytes.size());
  // The public half must be the seed's: a key file spliced together from two
  // keys would sign what nobody can verify.
  Pkey pkey(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr,
                                         reinterpret_cast<const unsigned char*>(key.seed_.data()), kKeyBytes));
  unsigned char derived[kKeyBytes];
  size_t len = sizeof(derived);
  if (pkey == nullptr || EVP_PKEY_get_raw_public_key(pkey.get(), derived, &len) != 1 || len != kKeyBytes ||
      key.public_ != std::string(reinterpret_cast<char*>(derived), len)) {
    return absl::InvalidArgumentError("Nix secret key whose public half does not match");
  }
  return key;
}

absl::StatusOr<SigningKey> SigningKey::Generate(absl::string_view name) {
  if (name.empty() || absl::StrContains(name, ':')) return absl::InvalidArgumentError("a key name without ':'");
  Pkey pkey(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  unsigned char seed[kKeyBytes], pub[kKeyBytes];
  size_t seed_len = sizeof(seed), pub_len = sizeof(pub);
  if (pkey == nullptr || EVP_PKEY_get_raw_private_key(pkey.get(), seed, &seed_len) != 1 ||
      EVP_PKEY_get_raw_public_key(pkey.get(), pub, &pub_len) != 1) {
    return absl::InternalError("cannot generate an Ed25519 key");
  }
  SigningKey key;
  key.name_ = std::string(name);
  key.seed_ = std::string(reinterpret_cast<char*>(seed), seed_len);
  key.public_ = std::string(reinterpret_cast<char*>(pub), pub_len);
  OPENSSL_cleanse(seed, sizeof(seed));
  return key;
}

std::string SigningKey::SecretKeyText() const { return absl::StrCat(name_, ":", absl::Base64Escape(seed_ + public_)); }

std::string SigningKey::PublicKeyText() const { return absl::StrCat(name_, ":", absl::Base64Escape(public_)); }

absl::StatusOr<std::string> SigningKey::Sign(absl::string_view fingerprint) const {
  Pkey pkey(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr,
                                         reinterpret_cast<const unsigned char*>(seed_.data()), seed_.size()));
  MdCtx ctx(EVP_MD_CTX_new());
  unsigned char sig[kSignatureBytes];
  size_t len = sizeof(sig);
  if (pkey == nullptr || ctx == nullptr || EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) != 1 ||
      EVP_DigestSign(ctx.get(), sig, &len, reinterpret_cast<const unsigned char*>(fingerprint.data()),
                     fingerprint.size()) != 1) {
    return absl::InternalError("Ed25519 signing failed");
  }
  return absl::StrCat(name_, ":", absl::Base64Escape(absl::string_view(reinterpret_cast<char*>(sig), len)));
}

bool VerifySignature(absl::string_view fingerprint, absl::string_view sig,
                     const std::vector<std::string>& public_keys) {
  std::string sig_name, sig_bytes;
  if (!SplitNamed(sig, kSignatureBytes, &sig_name, &sig_bytes)) return false;
  for (const std::string& text : public_keys) {
    std::string key_name, key_bytes;
    if (!SplitNamed(absl::StripAsciiWhitespace(text), kKeyBytes, &key_name, &key_bytes) || key_name != sig_name) {
      continue;
    }
    Pkey pkey(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                          reinterpret_cast<const unsigned char*>(key_bytes.data()), key_bytes.size()));
    MdCtx ctx(EVP_MD_CTX_new());
    if (pkey == nullptr || ctx == nullptr ||
        EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pkey.get()) != 1) {
      continue;
    }
    if (EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig_bytes.data()), sig_bytes.size(),
                         reinterpret_cast<const unsigned char*>(fingerprint.data()), fingerprint.size()) == 1) {
      return true;
    }
  }
  return false;
}

}  // namespace kiln
